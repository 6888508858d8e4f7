"""The statistics behind tools/experiment.py's verdicts, against values worked out by hand. (The experiments
themselves take minutes each and do not run here.)"""

import itertools
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from infra import evaluation
from tools import experiment
from data.corpus import Tokenizer
from model import kv_cache_bytes, preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ranks_share_the_mean_rank_of_a_tie():
    assert evaluation.ranks([10, 20, 20, 5]).tolist() == [2, 3.5, 3.5, 1]
    assert evaluation.ranks([7, 7, 7]).tolist() == [2, 2, 2]


def test_spearman_on_a_small_example_worked_by_hand():
    # y's ranks are [1, 2, 3.5, 5, 3.5]; centred: x [-2, -1, 0, 1, 2], y [-2, -1, .5, 2, .5];
    # sum of products 8, sums of squares 10 and 9.5: rho = 8 / sqrt(95)
    assert evaluation.spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95))
    assert evaluation.spearman([1, 2, 3, 4], [1, 8, 27, 1000]) == pytest.approx(1.0)  # any rising curve
    assert evaluation.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(evaluation.spearman([1, 2, 3], [2, 2, 2]))  # constant: no correlation to speak of
    with pytest.raises(ValueError, match="one length"):
        evaluation.spearman([1, 2, 3], [1, 2])


def test_mean_by_group_counts_only_the_masked_tokens_of_each_group():
    values = torch.tensor([[1., 2., 3., 4.], [5., 6., 7., 8.], [9., 10., 11., 12.]])
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 1], [1, 1, 1, 1]], dtype=torch.bool)
    # level 1: rows 0 and 2 -> 2, 3, 9, 10, 11, 12 -> 47 / 6; level 3: row 1 -> 8
    assert evaluation.mean_by_group(values, mask, [1, 3, 1]) == pytest.approx({1: 47 / 6, 3: 8.0})


def test_answer_mask_marks_the_positions_that_predict_the_answer():
    tok = Tokenizer("byte")
    problems = [{"prompt": "2+3=", "answer": "5"}, {"prompt": "12+34=", "answer": "46"}]
    idx, targets, mask = experiment.answer_batch(tok, problems)
    # row 1: [eot] 1 2 + 3 4 = | 4 6 eot: the positions of "=", "4" and "6" predict "4", "6" and eot
    assert tok.decode(idx[1, :7].tolist()) == "<|endoftext|>12+34="
    assert mask[1].nonzero().flatten().tolist() == [6, 7, 8]
    assert targets[1, 6:9].tolist() == [ord("4"), ord("6"), tok.eot]
    assert mask[0].nonzero().flatten().tolist() == [4, 5]  # "=" predicts "5", "5" predicts eot
    assert targets[0, 4:6].tolist() == [ord("5"), tok.eot] and (targets[0, 6:] == -1).all()


def test_bits_per_byte_by_position_worked_by_hand():
    token_loss = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    targets = torch.tensor([[0, 0, 1, 0], [0, 0, 0, 0]])
    token_bytes = torch.tensor([1, 0])  # id 1 stands for no text (an end-of-text): it counts in neither sum
    ln2 = math.log(2)
    expected = [(1 + 2 + 5 + 6) / (4 * ln2), (4 + 7 + 8) / (3 * ln2)]
    assert evaluation.bpb_by_position(token_loss, targets, token_bytes, 2) == pytest.approx(expected)
    with pytest.raises(ValueError, match="equal buckets"):
        evaluation.bpb_by_position(token_loss, targets, token_bytes, 3)


def test_a_difference_inside_the_seed_spread_is_no_difference():
    verdict = experiment.compare("bpb", "a", [1.00, 1.20], "b", [1.10, 1.30])
    assert "no difference at this scale" in verdict and "a - b = -0.100, per seed -0.100 to -0.100" in verdict
    verdict = experiment.compare("bpb", "a", [1.00, 1.10, 1.05], "b", [1.30, 1.40, 1.20])
    assert "a is better than b" in verdict and "a - b = -0.250, per seed -0.300 to -0.150" in verdict
    verdict = experiment.compare("accuracy", "a", [0.5, 0.6], "b", [0.1, 0.2], higher_is_better=True)
    assert "a is better than b" in verdict and "a - b = +0.400" in verdict
    assert experiment.mean_spread([1.0, 2.0, 4.0]) == (7 / 3, 1.5)
    assert "no verdict from one seed" in experiment.compare("bpb", "a", [1.0], "b", [2.0])


def test_the_ranges_rule_false_positive_rate_against_every_ordering():
    # Two arms with no difference: their 2n results in every order equally likely. Count the orders in which
    # one arm's n results all lie below the other's.
    for n, by_hand in ((2, 1 / 3), (3, 1 / 10), (4, 1 / 35)):
        orders = list(itertools.permutations(["a"] * n + ["b"] * n))
        apart = sum(o[:n] in (("a",) * n, ("b",) * n) for o in orders) / len(orders)
        assert experiment.false_positive_rate(n) == pytest.approx(apart) == pytest.approx(by_hand)


def test_kv_cache_bytes_measured_on_the_cache_equal_the_formula_and_a_hand_count():
    # tiny_8x64: LLLGLLLS, 2 K/V heads of 16, window 32, bf16. At 4096 positions: six local layers keep 32 positions,
    # one global keeps 4096, the sharing one none; each kept position holds K and V: 2 * 2 * 16 * 2 bytes.
    per_position = 2 * 2 * 16 * 2
    config = preset("tiny_8x64")
    assert kv_cache_bytes(config, 4096) == experiment.kv_formula(config, 4096) == \
        per_position * (6 * 32 + 4096)
    full = preset("tiny_8x64", attn_pattern="G", share_kv=False)
    assert kv_cache_bytes(full, 4096) == experiment.kv_formula(full, 4096) == per_position * 8 * 4096
    yi = preset("yi_lightning_like")
    assert kv_cache_bytes(yi, 65536) == experiment.kv_formula(yi, 65536)


def test_scale_shortens_every_stage_and_its_warmup(corpora):
    stages = experiment.scaled_stages(experiment.ARMS["stages"]["three_stages"], 0.1)
    assert [s["steps"] for s in stages] == [80, 110, 60]
    assert stages[0]["warmup"] == 5 and stages[0]["mixture"]["arith"] == 0.28


def test_an_empty_out_dir_is_refused():
    result = subprocess.run([sys.executable, "-m", "tools.experiment", "routing", "--out_dir="], capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 1 and "out_dir must name a folder" in result.stderr, result.stderr[-2000:]


@pytest.mark.parametrize("args,message", [
    (["routing", "--seeds=[]"], "seeds must be a non-empty list"),
    (["routing", "--seeds=[1, 1]"], "distinct"),
    (["routing", "--seeds=[1, -2]"], "whole numbers in [0, 2**32)"),
    (["routing", "--scale=0"], "scale must be > 0"),
    (["hybird"], "unknown experiment 'hybird'"),
    ([], "usage: python -m tools.experiment"),
])
def test_bad_experiment_arguments_exit_with_a_message_and_train_nothing(tmp_path, args, message):
    out_dir = tmp_path / "never"
    result = subprocess.run([sys.executable, "-m", "tools.experiment", *args, f"--out_dir={out_dir}"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and not out_dir.exists()


def test_every_arm_loads_and_the_hybrid_arms_match_in_size(corpora):
    import train
    from model import GPT
    params = {}
    for name, arms in experiment.ARMS.items():
        for arm, files in arms.items():
            _, model_cfg, _ = train.load_config(files)
            if name == "hybrid":
                params[arm] = GPT(model_cfg, verbose=False).num_params()
    assert set(params) == {"all_global", "hybrid", "hybrid_x0", "global_first"}
    assert all(abs(p / params["all_global"] - 1) < 0.02 for p in params.values()), params  # (hybrid_x0: 2 gains more)


def test_training_minutes_add_up_across_a_resume(tmp_path):
    records = [{"kind": "train", "step": i, "wall_s": w} for i, w in enumerate([10, 20, 30, 5, 15])]  # resumed at 5
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert experiment.training_minutes(tmp_path) == pytest.approx((30 + 15) / 60)


def test_the_ridge_probe_reads_a_linear_code_and_not_noise():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 16, (2000,), generator=g)
    codes = torch.randn(16, 32, generator=g)
    features = codes[labels] + 0.1 * torch.randn(2000, 32, generator=g)  # each label a direction, plus noise
    fit = torch.arange(2000) % 2 == 0
    assert evaluation.ridge_probe_accuracy(features, labels, fit) > 0.99
    shuffled = labels[torch.randperm(2000, generator=g)]  # labels that the features do not carry
    assert abs(evaluation.ridge_probe_accuracy(features, shuffled, fit) - 1 / 16) < 0.04


def test_a_report_whose_write_fails_leaves_the_previous_one_and_no_tmp(tmp_path):
    from infra.checkpoint import save_atomic
    path = str(tmp_path / "results.md")
    save_atomic("old report\n", path, write=experiment.write_text)

    def full_disk(text, file):
        experiment.write_text(text[:3], file)
        raise OSError(28, "No space left on device")
    with pytest.raises(SystemExit, match=r"could not write .*results.md .*Disk full"):
        save_atomic("new report\n", path, write=full_disk)
    assert os.listdir(tmp_path) == ["results.md"] and open(path).read() == "old report\n"
