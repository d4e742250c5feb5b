"""bench.peer, the side-by-side benchmark with open_clip_train: its smoke run end to end (tiny 32-pixel models, two
steps per run), so that it cannot rot, and its batch search's doubling and bisection."""
import argparse
import json

from bench import peer


def test_smoke_run_writes_results_and_the_step0_losses_agree(tmp_path):
    """open_clip_train (through bench.peer_launch) and engine.train from the same weights and the same first batch:
    open_clip's first logged loss equals the engine's task + hrd + the teacher's entropy within 1e-4; the plain runs
    give samples/s and a step breakdown for both tools; JSON, Markdown (and the plot) are written."""
    out = tmp_path / "out"
    peer.main(["--smoke", "--out", str(out), "--work-dir", str(tmp_path / "work")])
    results = json.loads((out / "peer.json").read_text())
    loss = results["sections"]["loss"]
    assert loss["passed"], loss
    assert abs(loss["engine_online"]["task_diff"]) <= peer.LOSS_TOLERANCE
    assert loss["logged_matches_recorded"]  # the recorded value is the one open_clip_train logs
    # hrd is a KL, open_clip's distill_loss a cross-entropy: the raw totals differ by the teacher's entropy
    assert abs(loss["engine_online"]["total_diff_raw"] + loss["open_clip"]["teacher_entropy"]) <= peer.LOSS_TOLERANCE
    runs = results["sections"]["plain"]["runs"]
    for run in runs["open_clip"] + runs["engine"]:
        assert run["returncode"] == 0 and run["samples_per_s"] > 0 and run["peak_tree_pss"] > 0, run
        assert set(run["breakdown"]) == set(peer.PHASE_NAMES) | {"other"}
    assert {t["target"] for t in results["targets"] if t["met"] is not None} >= {
        "plain CLIP: engine samples/s / open_clip_train's >= 0.95", "step-0 loss equal within 0.0001"}
    text = (out / "peer.md").read_text()
    assert "## Step-0 loss" in text and "Check (online teacher, within 0.0001): passed." in text
    assert "open_clip_train, plain CLIP" in text and "engine --preset baseline --fused" in text


def _searcher(limit: int, **settings) -> tuple[peer.Peer, list[int]]:
    searcher = peer.Peer.__new__(peer.Peer)  # the search alone: no work folder, no processes
    searcher.args = argparse.Namespace(**{"max_batch": 1 << 16, "bisections": 2, "probe_steps": 2,
                                          "accum_time_factor": 1.4, **settings})
    probed = []

    def probe(tool, batch, micro, estimate):
        probed.append(batch)
        return {"batch": batch, "fits": batch <= limit, "reason": "" if batch <= limit else "cap"}

    searcher.probe = probe
    return searcher, probed


def test_search_doubles_until_the_cap_then_bisects():
    searcher, probed = _searcher(limit=100)
    result = searcher.search("open_clip", 8, 8, None, None, deadline=float("inf"))
    assert probed == [8, 16, 32, 64, 128, 96, 112]
    assert (result["largest_fitting"], result["smallest_failing"], result["stopped"]) == (96, 112, None)


def test_search_skips_probes_past_the_time_budget():
    """A probe whose estimated time would pass the deadline is not run: the result is a lower bound, said so."""
    searcher, probed = _searcher(limit=10_000)
    # 1 s per sample, 2 steps per probe, no start-up: a probe at 64 would take about 128 s
    result = searcher.search("open_clip", 8, 8, 1.0, 0.0, deadline=peer.time.perf_counter() + 100)
    assert probed == [8, 16, 32] and result["largest_fitting"] == 32 and result["smallest_failing"] is None
    assert result["stopped"] == "time: a probe at 64 would take about 128 s"
