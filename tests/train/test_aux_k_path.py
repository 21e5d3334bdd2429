"""AuxK's decode (dead columns by matmul, or gathered): timed on the running device near the
table's crossover, kept once chosen, made the same on every rank, pinned by a checkpoint."""

import re

import pytest
import torch

from pipeline.train import aux_k_path
from pipeline.train.aux_k import aux_k_loss
from pipeline.train.aux_k_path import Problem, choose, needs_probe, uses_columns

D_MODEL, D_SAE, K_AUX, ROWS = 128, 4096, 128, 1024
N_DEAD = 1024  # n_dead / k_aux = 8: within the band; the table says gathered (8 > 4)
# ROWS * D_MODEL * N_DEAD = 2**27: the smallest problem timed


@pytest.fixture(autouse=True)
def no_choices():
    aux_k_path.paths.forget()
    yield
    aux_k_path.paths.forget()


def sparse_topk_step():
    """A sparse TopK step's AuxK inputs: pre-activations without a graph, the encoder beside them."""
    torch.manual_seed(0)
    W_enc = torch.randn(D_MODEL, D_SAE, requires_grad=True)
    b_enc = torch.zeros(D_SAE, requires_grad=True)
    W_dec = torch.randn(D_SAE, D_MODEL, requires_grad=True)
    x = torch.randn(ROWS, D_MODEL)
    with torch.no_grad():
        hidden_pre = x @ W_enc + b_enc
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[torch.randperm(D_SAE)[:N_DEAD]] = True
    return torch.randn(ROWS, D_MODEL), hidden_pre, dead, W_dec, (x, W_enc, b_enc)


def problem(n_dead: int = N_DEAD) -> Problem:
    return Problem("cpu", "float32", D_MODEL, D_SAE, K_AUX, n_dead)


def test_near_the_crossover_both_decodes_are_timed_once_and_the_faster_is_kept(capsys):
    residual, hidden_pre, dead, W_dec, encoder = sparse_topk_step()
    columns = choose(residual, hidden_pre, dead, W_dec, K_AUX, encoder)
    line = capsys.readouterr().err
    key = problem().key
    match = re.search(rf"aux-k decode for {re.escape(key)}: (\w+) \(columns ([\d.]+) ms, gathered ([\d.]+) ms: "
                      rf"one forward \+ backward of {ROWS} rows\)", line)
    assert match, line
    chosen, columns_ms, gathered_ms = match.group(1), float(match.group(2)), float(match.group(3))
    # the table's decode (gathered here) stays unless columns take < 90% of its time
    assert chosen == ("columns" if columns_ms < 0.9 * gathered_ms else "gathered")
    assert columns == (chosen == "columns") == uses_columns(problem())
    assert aux_k_path.paths.all() == {key: chosen}
    assert all(p.grad is None for p in (W_dec, *encoder[1:]))  # the timing returned its gradients
    assert choose(residual, hidden_pre, dead, W_dec, K_AUX, encoder) == columns  # kept: not timed again
    assert "aux-k decode" not in capsys.readouterr().err


def test_without_the_encoder_the_timing_stops_at_the_pre_activations(capsys):
    residual, hidden_pre, dead, W_dec, (x, W_enc, b_enc) = sparse_topk_step()
    graph = x @ W_enc + b_enc  # the dense path: pre-activations with a graph to the encoder
    choose(residual, graph, dead, W_dec, K_AUX, None)
    assert f"aux-k decode for {problem().key}: " in capsys.readouterr().err
    assert all(p.grad is None for p in (W_dec, W_enc, b_enc))
    aux_k_loss(residual, graph, dead, W_dec, K_AUX, columns=uses_columns(problem())).backward()  # the graph is intact
    assert W_enc.grad is not None and float(W_enc.grad[:, ~dead].abs().sum()) == 0


def test_far_from_the_crossover_or_small_problems_the_table_decides():
    assert needs_probe(problem(), ROWS) and not needs_probe(problem(), ROWS // 2)  # under 2**27 multiply-adds
    assert not needs_probe(problem(K_AUX // 2), 8 * ROWS) and uses_columns(problem(K_AUX // 2))  # 0.5 k_aux dead
    assert not needs_probe(problem(32 * K_AUX), ROWS) and not uses_columns(problem(32 * K_AUX))  # 32 k_aux dead
    assert not needs_probe(problem(0), ROWS)
    residual, hidden_pre, dead, W_dec, encoder = sparse_topk_step()
    assert choose(residual[:512], hidden_pre[:512], dead, W_dec, K_AUX, (encoder[0][:512], *encoder[1:])) is False
    assert aux_k_path.paths.all() == {}


def test_the_dead_count_is_kept_by_its_power_of_two_class():
    assert problem(600).key == problem(N_DEAD).key and problem(N_DEAD + 1).key != problem(N_DEAD).key


def test_every_rank_takes_the_agreed_decode_and_a_checkpoints_choice_is_not_timed_again(capsys):
    residual, hidden_pre, dead, W_dec, encoder = sparse_topk_step()
    assert choose(residual, hidden_pre, dead, W_dec, K_AUX, encoder, agree=lambda mine: "columns") is True
    aux_k_path.paths.forget()
    capsys.readouterr()
    aux_k_path.paths.pin({problem().key: "columns"})
    assert choose(residual, hidden_pre, dead, W_dec, K_AUX, encoder) is True
    assert "aux-k decode" not in capsys.readouterr().err
