"""The expert-parallel runtime on prepared weights: the Hub FP8 fixture -> prepare_weights for 2
ranks (bf16; shared and per-rank layouts) -> `torchrun --nproc-per-node 2 run_example.py --mode
generate --weights DIR`, each rank loading only its own file set (the per-rank case also keeps
an expert subset).

Oracle: `MiMoV2FlashModel.from_pretrained(DIR)` in one process (the same bf16 files, every rank's
experts). Greedy tokens must be identical. The expert-parallel logits differ from the single
process only by summation order (within 1e-4 of the logit scale, `test_parallel_torchrun`), so
every generated token's top-2 logit margin in the oracle is checked to exceed twice that: equal
tokens are then what the runtime must produce, not luck.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from hub_fixture import write_hub_fixture
from mimo_v2_flash import MiMoV2FlashModel
from mimo_v2_flash.checkpoint import PreparedCheckpoint
from mimo_v2_flash.placement import PlacementError
from mimo_v2_flash.weights import model_tensors, mtp_tensors
from mimo_prepare_weights.convert import PER_RANK, SHARED, convert
from test_parallel_torchrun import launch

WORLD = 2
NEW_TOKENS = 4
MIN_MARGIN = 2e-4      # of the logit scale: two logits, each within the 1e-4 bound, cannot swap places


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    return write_hub_fixture(tmp_path_factory.mktemp("hub") / "ckpt")


# (layout, expert subset): the shared replicated file with every expert; self-contained rank
# files of a subset (rank 0 holds experts 0..7, rank 1 only expert 12; the router picks among those 9).
CASES = {SHARED: None, PER_RANK: [*range(8), 12]}


@pytest.fixture(scope="module")
def prepared(hub, tmp_path_factory):
    """{layout: directory prepared for WORLD ranks, with that layout's expert subset}"""
    root = tmp_path_factory.mktemp("prepared")
    dirs = {}
    for layout, subset in CASES.items():
        dirs[layout] = str(root / layout)
        convert(hub.path, dirs[layout], world_size=WORLD, expert_subset=subset, progress=False, replicated=layout)
    return dirs


@pytest.mark.parametrize("layout", CASES)
def test_torchrun_on_prepared_weights_matches_single_process(prepared, layout, tmp_path):
    out = prepared[layout]
    oracle = MiMoV2FlashModel.from_pretrained(out)
    prompts = np.random.default_rng(5).integers(0, oracle.config.vocab_size, (3, 6))   # rank 0: 2, rank 1: 1
    expected = oracle.generate(prompts, NEW_TOKENS)
    logits = oracle.forward(expected[:, :-1])[:, prompts.shape[1] - 1:]     # the logits behind each new token
    top2 = np.sort(logits, axis=-1)[..., -2:]
    assert (np.argmax(logits, -1) == expected[:, prompts.shape[1]:]).all()
    assert (top2[..., 1] - top2[..., 0]).min() > MIN_MARGIN * np.abs(logits).max()

    ids = ";".join(",".join(map(str, row)) for row in prompts)
    code, _, output = launch(WORLD, ["run_example.py", "--mode", "generate", "--weights", out, "--prompt-ids", ids,
                                     "--max-new-tokens", str(NEW_TOKENS), "--json", str(tmp_path / "ep.json")], 120)
    assert code == 0, output[-3000:]
    assert f"{out} (bf16, {layout} layout" in output and "rows sent" in output     # rank 0's report
    ep = json.loads((tmp_path / "ep.json").read_text())
    assert ep["tokens"] == expected.tolist()
    assert ep["ep"]["dropped_tokens"] == 0
    assert [r["tokens"] > 0 and r["expert_rows"] > 0 for r in ep["ep"]["ranks"]] == [True] * WORLD
    # Each rank holds the replicated tensors (MTP layers included) and its own stored experts,
    # nothing more (float32).
    checkpoint = PreparedCheckpoint(out)
    config = checkpoint.runnable_config()
    for rank in range(WORLD):
        specs = model_tensors(config, experts=checkpoint.experts_of(rank)) + mtp_tensors(config)
        assert ep["weight_bytes"][rank] == 4 * sum(int(np.prod(s.shape)) for s in specs)


def test_world_size_mismatch_stops_every_rank(hub, tmp_path):
    out = tmp_path / "four"
    convert(hub.path, out, world_size=4, progress=False)
    code, seconds, output = launch(WORLD, ["run_example.py", "--mode", "generate", "--weights", str(out)], 120)
    assert code != 0 and seconds < 60
    message = (f"{out}/manifest.json: the weights are prepared for 4 ranks, this run has 2 (WORLD_SIZE); "
               "launch torchrun with --nproc-per-node 4, or prepare again with --world-size 2")
    for rank in range(WORLD):
        assert f"[rank {rank}] expert-parallel run failed: {message}" in output, output[-3000:]


def test_placement_must_match_the_prepared_files(prepared, tmp_path):
    from mimo_parallel.run import prepared_rank_weights
    out = prepared[SHARED]
    held = prepared_rank_weights(out, WORLD, 1, "contiguous")    # the files' placement, named
    assert held.placement.experts_of(1) == list(range(8, 16)) and held.routable is None
    swapped = tmp_path / "swapped.json"      # experts 7 and 8 trade ranks
    swapped.write_text(json.dumps({"world_size": WORLD, "rank_of": [0] * 7 + [1, 0] + [1] * 7}))
    with pytest.raises(PlacementError, match=f"--ep-placement {swapped} puts expert 7 on rank 1, the prepared "
                                             r"files on rank 0 \(2 experts differ\)"):
        prepared_rank_weights(out, WORLD, 0, str(swapped))
    with pytest.raises(PlacementError, match="prepared for 2 ranks, this run has 4"):
        prepared_rank_weights(out, 4, 0)
