"""`GpuTurns`: a worker's shards take the pipeline one at a time, in the order they arrived."""

from __future__ import annotations

import threading

from helpers import wait_for
from sdfleet.actors.gpu_turns import GpuTurns


def in_thread(target) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def test_tickets_are_served_in_the_order_they_were_taken():
    turns = GpuTurns()
    tickets = [turns.take() for _ in range(4)]
    served = []

    def shard(ticket):
        with turns.turn(ticket):
            served.append(ticket)

    # Started last ticket first: each waits for the ones before it.
    threads = [in_thread(lambda t=t: shard(t)) for t in reversed(tickets)]
    for thread in threads:
        thread.join(timeout=10)
    assert served == tickets


def test_a_ticket_given_back_before_its_turn_does_not_hold_up_the_next():
    turns = GpuTurns()
    first, skipped, third = turns.take(), turns.take(), turns.take()
    turns.release(skipped)  # e.g. its shard was already committed
    turns.release(skipped)  # giving it back twice changes nothing
    entered = threading.Event()

    def third_shard():
        with turns.turn(third):
            entered.set()

    waiting = in_thread(third_shard)
    assert not entered.wait(0.3), "the third ticket went ahead of the first"
    with turns.turn(first):
        pass
    waiting.join(timeout=10)
    assert entered.is_set()


def test_a_waiting_shard_checks_in_while_it_waits_and_may_give_up():
    turns = GpuTurns()
    first, second = turns.take(), turns.take()
    checks, stop, outcome = [], threading.Event(), []

    class Preempted(Exception):
        pass

    def check():
        checks.append(1)
        if stop.is_set():
            raise Preempted

    def second_shard():
        try:
            with turns.turn(second, check):
                outcome.append("ran")
        except Preempted:
            outcome.append("gave up")

    with turns.turn(first):
        waiting = in_thread(second_shard)
        wait_for(lambda: checks, 5, "the waiting shard to check in")
        stop.set()
        waiting.join(timeout=10)
        assert outcome == ["gave up"]


def test_a_paused_shard_lets_the_next_generate_and_takes_the_pipeline_back():
    turns = GpuTurns()
    first, second = turns.take(), turns.take()
    log, scores_ready = [], threading.Event()

    def first_shard():
        with turns.turn(first):
            log.append("first: round 1")
            with turns.pause(first):  # waiting for round 1's scores
                scores_ready.wait(10)
            log.append("first: round 2")

    def second_shard():
        with turns.turn(second):
            log.append("second: start")
            scores_ready.set()
            wait_for(lambda: len(log) >= 2, 5, "the log")
            log.append("second: end")

    a = in_thread(first_shard)
    b = in_thread(second_shard)
    a.join(timeout=10)
    b.join(timeout=10)
    # The second shard had the pipeline during the pause; the first got it back only once it was free.
    assert log == ["first: round 1", "second: start", "second: end", "first: round 2"]


def test_after_a_pause_the_shard_holds_the_pipeline_again():
    turns = GpuTurns()
    first, second = turns.take(), turns.take()
    entered = threading.Event()

    def second_shard():
        with turns.turn(second):
            entered.set()

    with turns.turn(first):
        with turns.pause(first):  # no one waiting: straight back
            pass
        waiting = in_thread(second_shard)
        assert not entered.wait(0.3), "the second shard entered while the first held the pipeline"
    waiting.join(timeout=10)
    assert entered.is_set()
