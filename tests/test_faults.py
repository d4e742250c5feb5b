"""bench.faults once at a tiny size: engine.precompute and engine.train killed with SIGKILL at a random moment,
resumed, and compared with uninterrupted runs (the full script: ``python -m bench.faults``)."""
import json

from bench import faults


def test_killed_commands_resume_to_the_uninterrupted_result(tmp_path):
    out = tmp_path / "faults.json"
    rows = faults.faults(["--trials", "1", "--samples", "32", "--shard-size", "16", "--epochs", "2", "--seed", "10",
                          "--out", str(out)])
    assert [row["command"] for row in json.loads(out.read_text())["rows"]] == ["engine.precompute", "engine.train"]
    store, train = (row["problems"] for row in rows)
    assert store == []  # the store's arrays identical, no temporaries
    assert train == []  # final weights and every epoch_K.pt bit-identical, no temporaries
