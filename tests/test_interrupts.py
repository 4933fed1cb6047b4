"""Ctrl-C and SIGTERM at any moment of `sdfleet run`: one line saying how far the job got, exit
130 / 143, and the same command resumes into the dataset an uninterrupted run makes.

Real parts only: the CLI as a subprocess, the session's Ray cluster, the local S3 server (behind
the fault proxy where a moment must be held still), the tiny SD2 pipeline.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import threading
import time

import pytest

from helpers import (
    assert_exactly_once,
    bucket_with_prompts,
    job_spec,
    output_storage,
    same_dataset,
    start_cli,
    wait_for,
)
from s3proxy import Rule, S3Proxy
from sdfleet.jobs.interrupts import Interrupt, Interrupts

# Seeded: the same moments every run. At least 20 interrupts, each SIGINT or SIGTERM.
SEED = 33
INTERRUPTS = 20
# The interpreter's own start, before any of sdfleet's code runs, cannot handle a signal: the
# earliest moment tried is past it (the CLI installs its handlers before loading anything heavy).
EARLIEST_S = 0.5
SIGNALS = (signal.SIGINT, signal.SIGTERM)


def interrupted_line(stderr: str, sig: int) -> str:
    """The one line an interrupt prints, which must also be stderr's last; no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    ours = [line for line in lines if line.startswith("sdfleet: interrupted")]
    assert len(ours) == 1, stderr[-3000:]
    assert lines[-1] == ours[0], stderr[-3000:]
    assert "Traceback" not in stderr and "SystemError" not in stderr, stderr[-3000:]
    assert ours[0].startswith(f"sdfleet: interrupted ({sig.name}) ")
    assert ours[0].endswith("; rerun the same command to resume")
    return ours[0]


def signal_self(sig: int) -> None:
    """A real signal to this process; its Python handler runs before this returns."""
    os.kill(os.getpid(), sig)
    time.sleep(0.05)


def test_a_deferred_signal_is_raised_when_its_block_ends_and_ray_inits_sigterm_exit_counts():
    """Real signals to this process. In a deferred block (Ray's calls, the claim, finalize) the
    signal is recorded and raised at the block's end; ray.init swaps in a SIGTERM handler that
    raises SystemExit(15): that exit is taken as the SIGTERM, and the handlers come back."""
    stop, before = Interrupts(), signal.getsignal(signal.SIGTERM)
    with stop.handling():
        with pytest.raises(Interrupt), stop.deferred():
            signal_self(signal.SIGINT)
            reached_the_end = True  # not cut short
        assert reached_the_end and stop.exit_code == 130
        stop.reset()
        with pytest.raises(Interrupt), stop.ray_init():
            signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))  # as ray.init
            signal_self(signal.SIGTERM)
        assert stop.exit_code == 143
        assert getattr(signal.getsignal(signal.SIGTERM), "__self__", None) is stop
        stop.reset()
        with pytest.raises(Interrupt):  # where raising is safe, at once
            signal_self(signal.SIGTERM)
            raise AssertionError("not reached")
        stop.reset()
        stop.decided()  # the command's outcome is decided: a signal now changes nothing
        signal_self(signal.SIGINT)
        assert stop.pending
    assert signal.getsignal(signal.SIGTERM) == before


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_a_signal_while_planning_waits_on_s3_stops_in_one_line(
    sig, tmp_path, tiny_model, s3_endpoint
):
    """The moment is held still: every request for the prompts hangs at the proxy until the
    signal has done its work. Nothing is written to the output."""
    fs = bucket_with_prompts("planning")
    held = threading.Event()
    rule = Rule(path=r"prompts", action="hang", hold=held, hang_s=120)
    proxy = S3Proxy(s3_endpoint, [rule])
    try:
        out = f"s3://{fs.bucket}/out"
        proc = start_cli(
            "run",
            str(job_spec(tmp_path, tiny_model, fs, out)),
            "--no-progress",
            env={"AWS_ENDPOINT_URL": proxy.url, "RAY_ADDRESS": ""},
        )
        wait_for(lambda: rule.fired, 60, "the driver to ask for its prompts")
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
    finally:
        held.set()
        proxy.close()
    assert proc.returncode == 128 + sig, stderr[-3000:]
    line = interrupted_line(stderr, sig)
    assert "before the job started; nothing was written" in line
    assert not output_storage(out).list("*")


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_interrupts_at_random_moments_stop_cleanly_and_the_reruns_finish_the_same_dataset(
    tmp_path, tiny_model, ray_cluster, s3_endpoint
):
    """One uninterrupted reference run, then a chain on an output of its own: run, signal after a
    seeded random delay (anywhere from start-up to finalize), rerun the same command, signal
    again, ... INTERRUPTS times, then the same command once more to the end. (A run that finishes
    before its signal ends the chain, checked like the last; the next one starts on a new output.)
    Every interrupt ends in exit 128 + signal and its one line; no rerun is refused as busy; every
    chain's output holds exactly the reference's rows and tars, each shard committed once."""
    fs = bucket_with_prompts("interrupts")
    address = ray_cluster.address

    def spec_for(out: str):
        # One worker: two loading their models at once on two shared cores only slow each other.
        return job_spec(tmp_path, tiny_model, fs, out, resources={"max_workers": 1})

    def run(spec, sig=None, delay=0.0):
        """Exit code, stdout, stderr and seconds taken of one `sdfleet run`, signalled at `delay`."""
        began = time.monotonic()
        proc = start_cli("run", str(spec), "--address", address, "--no-progress")
        if sig is not None:
            time.sleep(delay)
            if proc.poll() is None:
                proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=300)
        return proc.returncode, stdout, stderr, time.monotonic() - began

    reference = f"s3://{fs.bucket}/reference"
    code, _, stderr, span_s = run(spec_for(reference))
    assert code == 0, stderr[-3000:]

    rng = random.Random(SEED)
    lines: list[str] = []
    chains = 0
    while len(lines) < INTERRUPTS:
        chains += 1
        out = f"s3://{fs.bucket}/chain-{chains}"
        spec = spec_for(out)
        code = None
        while code != 0 and len(lines) < INTERRUPTS:
            # Up to the length of the last whole run: the reference's cold start at first.
            sig, delay = rng.choice(SIGNALS), rng.uniform(EARLIEST_S, span_s)
            code, stdout, stderr, took_s = run(spec, sig, delay)
            print(f"chain {chains}: {sig.name} at {delay:.1f}s -> {code}: {stderr[-200:]}")
            if code == 0:  # it finished before the signal landed (or while the process exited)
                assert "dataset complete" in stdout and "interrupted" not in stderr, stderr
                span_s = took_s
                break
            assert code == 128 + sig, stderr[-3000:]
            lines.append(interrupted_line(stderr, sig))
        if code != 0:
            code, _, stderr, _ = run(spec)
            assert code == 0, stderr[-3000:]
        assert_exactly_once(out)
        same_dataset(reference, out)
    # The moments spread over the job: some before its first commit or part-way, not all at its end.
    assert any(" of 8 shards committed" in line and " 8 of 8 " not in line for line in lines), lines
