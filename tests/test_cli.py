"""The CLI's one error policy: a failure the user can fix is one line that names the URI or value and
says what to do, exit 1; the traceback only with -v. Storage failures are real ones, from the local
S3 server over HTTP: no credentials, a bucket that does not exist, an endpoint nobody listens on.
"""

from __future__ import annotations

import subprocess
import time

import pytest

from helpers import free_port, run_cli, spec_dict, write_prompts, write_spec

# No credentials anywhere botocore looks (conftest keeps it off the instance-metadata address).
NO_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": None,
    "AWS_SECRET_ACCESS_KEY": None,
    "AWS_SESSION_TOKEN": None,
    "AWS_PROFILE": None,
    "AWS_CONFIG_FILE": "/nonexistent",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
}


def spec_file(tmp_path, input_uri: str) -> str:
    spec = spec_dict(
        input={"uri": input_uri}, output={"uri": str(tmp_path / "out")}, safety={"detector": "none"}
    )
    return str(write_spec(tmp_path, spec, "job.yaml"))


def one_line_error(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 1, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("sdfleet: error: "), done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    return lines[0]


@pytest.fixture
def prompts_on_s3(s3):

    write_prompts(f"{s3.bucket}/prompts/p.parquet", ["a red bicycle"], storage=s3)
    return f"s3://{s3.bucket}/prompts/"


def test_plan_without_credentials_says_what_to_set(tmp_path, prompts_on_s3):
    line = one_line_error(run_cli("plan", spec_file(tmp_path, prompts_on_s3), env=NO_CREDENTIALS))
    assert (
        prompts_on_s3.rstrip("/") in line
        and "no AWS credentials" in line
        and "AWS_ACCESS_KEY_ID" in line
    )


def test_plan_of_a_missing_bucket_names_it(tmp_path, s3_endpoint):
    line = one_line_error(
        run_cli("plan", spec_file(tmp_path, "s3://no-such-bucket-sdfleet/prompts/"))
    )
    assert (
        "s3://no-such-bucket-sdfleet/prompts/" in line
        and "no bucket 'no-such-bucket-sdfleet'" in line
    )


def test_plan_against_an_unreachable_endpoint_names_the_endpoint(tmp_path, prompts_on_s3):
    dead = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    line = one_line_error(
        run_cli("plan", spec_file(tmp_path, prompts_on_s3), env={"AWS_ENDPOINT_URL": dead})
    )
    assert prompts_on_s3.rstrip("/") in line and f"cannot connect to the S3 endpoint {dead}" in line
    assert time.monotonic() - t0 < 15  # not after botocore's minute of retries


@pytest.fixture
def silent_endpoint():
    """A loopback S3 endpoint that accepts connections and never answers (a wrong port that some
    other server holds, a hung proxy): its URL."""
    import socket
    import threading

    server = socket.create_server(("127.0.0.1", 0))
    held, stop = [], threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


# Credentials for a local server, and nothing that could reach beyond loopback.
LOCAL_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def test_plan_against_an_endpoint_that_never_answers_names_the_input_in_seconds(
    tmp_path, silent_endpoint
):
    uri = "s3://prompts/v1/"
    t0 = time.monotonic()
    line = one_line_error(
        run_cli(
            "plan",
            spec_file(tmp_path, uri),
            env={**LOCAL_CREDENTIALS, "AWS_ENDPOINT_URL": silent_endpoint},
        )
    )
    assert time.monotonic() - t0 < 15  # not botocore's minute of read timeouts and retries
    assert f"input.uri {uri}" in line and f"S3 endpoint {silent_endpoint} did not answer" in line
    assert "_job.json" not in line


def test_plan_with_an_output_behind_a_closed_port_names_the_output(tmp_path):
    write_prompts(tmp_path / "in" / "p.parquet", ["a red bicycle"])
    dead = f"http://127.0.0.1:{free_port()}"
    spec = spec_dict(
        input={"uri": str(tmp_path / "in")},
        output={"uri": "s3://results/v1", "storage_options": {"endpoint_url": dead}},
        safety={"detector": "none"},
    )
    t0 = time.monotonic()
    line = one_line_error(
        run_cli("plan", str(write_spec(tmp_path, spec, "job.yaml")), env=LOCAL_CREDENTIALS)
    )
    assert time.monotonic() - t0 < 15
    assert "s3://results/v1" in line and f"cannot connect to the S3 endpoint {dead}" in line


def test_status_of_a_folder_that_is_not_an_output(tmp_path):
    line = one_line_error(run_cli("status", str(tmp_path)))
    assert str(tmp_path) in line and "not an sdfleet output" in line


def test_verbose_shows_the_traceback_behind_the_line(tmp_path):
    done = run_cli("-v", "status", str(tmp_path))
    assert done.returncode == 1
    assert "Traceback" in done.stderr and done.stderr.rstrip().splitlines()[-1].startswith(
        "sdfleet: error: "
    )
