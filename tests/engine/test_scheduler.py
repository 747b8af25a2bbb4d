"""engine.scheduler: the step plan as a pure function of queues and budgets."""

from engine.scheduler import schedule


def test_running_sequences_decode_first_and_prompts_share_what_is_left():
    plan = schedule(num_decoding=6, prefilling=[], waiting=[("a", 5), ("b", 7)], free_slots=4, max_batch_tokens=16)
    assert plan.num_decoding == 6
    assert plan.prefill == (("a", 5), ("b", 5))  # b gets the 5 tokens left, the rest next step
    assert plan.admit == ("a", "b")
    assert plan.num_tokens == 16


def test_a_long_prompt_is_chunked_over_steps_and_continues_before_new_admissions():
    first = schedule(num_decoding=2, prefilling=[], waiting=[("long", 100)], free_slots=3, max_batch_tokens=32)
    assert first.prefill == (("long", 30),) and first.admit == ("long",)
    second = schedule(num_decoding=2, prefilling=[("long", 70)], waiting=[("short", 3)], free_slots=2,
                      max_batch_tokens=32)
    assert second.prefill == (("long", 30),) and second.admit == ()  # the budget went to the prompt already started
    last = schedule(num_decoding=2, prefilling=[("long", 10)], waiting=[("short", 3)], free_slots=2,
                    max_batch_tokens=32)
    assert last.prefill == (("long", 10), ("short", 3)) and last.admit == ("short",)


def test_admission_is_in_arrival_order_and_stops_when_slots_run_out():
    plan = schedule(num_decoding=0, prefilling=[], waiting=[("a", 1), ("b", 1), ("c", 1)], free_slots=2,
                    max_batch_tokens=100)
    assert plan.admit == ("a", "b")
    none = schedule(num_decoding=0, prefilling=[], waiting=[("a", 1)], free_slots=0, max_batch_tokens=100)
    assert none.admit == () and none.prefill == ()


def test_a_full_budget_of_decodes_admits_nothing():
    plan = schedule(num_decoding=8, prefilling=[("p", 4)], waiting=[("w", 1)], free_slots=8, max_batch_tokens=8)
    assert plan.prefill == () and plan.admit == ()
