from services.common import pb
from services.demo.pipeline import _stop_note
from services.demo.watch import RunWatch


def test_a_run_stopped_before_its_held_out_set_was_complete_is_not_called_evaluated() -> None:
    # A run stopped at the time budget while the teacher was still answering held-out prompts was reported as
    # "last checkpoint evaluated" although it had no evaluation at all.
    watch = RunWatch(progress=pb.trainer.RunProgress(step=240))
    note = _stop_note(600, watch)
    assert "not evaluated" in note and "step 240" in note

    watch.evals.append({"step": 240, "accuracy": 0.1})
    assert "(step 240) evaluated" in _stop_note(600, watch)
