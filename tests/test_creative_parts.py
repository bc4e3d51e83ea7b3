"""Creative4U parts: the creative simulator, the pair builder, rationales and rewards, the small
selector's decoding, the GRPO objective and the selection metrics."""

import io

import numpy as np
import polars as pl
import pytest
import torch

from ctr.creative.evaluate import selection_metrics
from ctr.creative.module import grpo_objective, group_advantages
from ctr.creative.pairs import PairConfig, build_pairs
from ctr.creative.prompts import parse, rationale, rewards, swap_text
from ctr.creative.selector import SmallPrompt, SmallSelector, WordVocab
from ctr.creative.world import ASPECTS, CreativeSimConfig, simulate_creatives
from ctr.data.contract import ContractError


@pytest.fixture(scope="module")
def world():
    return simulate_creatives(CreativeSimConfig(n_products=30, seed=3))


def test_world_is_deterministic_and_its_log_follows_the_click_model(world):
    again = simulate_creatives(CreativeSimConfig(n_products=30, seed=3))
    assert again.creatives.equals(world.creatives) and again.log.equals(world.log)
    other = simulate_creatives(CreativeSimConfig(n_products=30, seed=4))
    assert not other.log["clicks"].equals(world.log["clicks"])
    log = world.log
    assert log.height == 30 * 2 * 4  # every context x every creative of its product
    total = sum(log[f"u_{a}"].to_numpy() for a in ASPECTS)
    np.testing.assert_allclose(total, log["utility"].to_numpy())
    assert (log["clicks"] <= log["impressions"]).all()
    # the creatives of one product in one context share the product's effect: without creative noise
    # their true-CTR logits differ exactly by their utilities
    quiet = simulate_creatives(CreativeSimConfig(n_products=30, seed=3, creative_noise_sd=0.0)).log
    logit = np.log(quiet["true_ctr"] / (1 - quiet["true_ctr"])).to_numpy() - quiet["utility"].to_numpy()
    per_ctx = pl.DataFrame({"c": quiet["context_id"], "b": logit}).group_by("c").agg(pl.col("b").std())
    assert float(per_ctx["b"].max()) < 1e-9
    from PIL import Image
    im = Image.open(io.BytesIO(world.creatives["image"][0]))
    assert im.size == (128, 128)
    # a query with an intent word: the deal intent's query carries one of its words
    deal = world.contexts.filter(pl.col("intent") == "deal")["query"].to_list()
    assert all(any(w in q for w in ("sale", "cheap", "discount", "deal", "offer")) for q in deal)


def test_aspect_effects_depend_on_the_intent():
    from ctr.creative.world import Attractiveness, INTENTS, TEXTS
    a = Attractiveness()
    levels = {k: np.zeros(3, dtype=np.int64) for k in ("framing", "background", "brightness", "clutter", "shown")}
    levels["text"] = np.full(3, TEXTS.index("banner"))
    c = a.contributions(levels, np.arange(3), np.full(3, -1))
    assert c["text"][INTENTS.index("deal")] == 0.6 and c["text"][INTENTS.index("browse")] == -0.15
    # the query's colour: shown main (0) matches a main-colour query, mismatches an alt-colour one
    c = a.contributions({**levels, "text": np.zeros(3, dtype=np.int64)}, np.zeros(3, dtype=np.int64),
                        np.array([0, 1, -1]))
    assert list(c["relevance"]) == [0.5, -0.5, 0.0]


def _log(rows):
    return pl.DataFrame(rows, schema=["product_id", "context_id", "creative_id", "impressions", "clicks"], orient="row")


def test_pairs_keep_exactly_the_gap_and_impression_thresholds():
    log = _log([
        (0, 0, 0, 2000, 100),   # ctr .050
        (0, 0, 1, 2000, 60),    # ctr .030: gap .667 vs 0 -> kept
        (0, 0, 2, 2000, 64),    # ctr .032: gap .5625 vs 0 -> dropped; vs 1 gap .067 dropped
        (0, 0, 3, 900, 10),     # too few impressions
        (1, 1, 4, 5000, 500),   # ctr .10
        (1, 1, 5, 5000, 100),   # ctr .02: gap 4 -> kept
    ])
    p = build_pairs(log, PairConfig(seed=0, split=(1, 0, 0)))
    got = {(min(a, b), max(a, b)) for a, b in zip(p["creative_a"], p["creative_b"])}
    assert got == {(0, 1), (4, 5)}
    for r in p.iter_rows(named=True):
        winner = r["creative_a"] if r["label"] == "A" else r["creative_b"]
        assert winner in (0, 4)
        assert r["ctr_a"] == pytest.approx(r["clicks_a"] / r["impressions_a"])
    gaps = dict(zip(p["product_id"].to_list(), p["gap"].to_list()))
    assert gaps == pytest.approx({0: 0.05 / 0.03 - 1, 1: 4.0})
    # thresholds are config
    assert build_pairs(log, PairConfig(min_ctr_gap=1.0, split=(1, 0, 0))).height == 1
    low = build_pairs(log, PairConfig(min_impressions=100, split=(1, 0, 0)))
    assert 3 in set(low["creative_a"].to_list()) | set(low["creative_b"].to_list())


def test_creatives_without_clicks_are_a_tie_not_a_pair():
    log = _log([(0, 0, 0, 2000, 0), (0, 0, 1, 2000, 0), (1, 1, 2, 2000, 0), (1, 1, 3, 2000, 10)])
    p = build_pairs(log, PairConfig(split=(1, 0, 0)))
    assert p.height == 1 and p["gap"][0] == float("inf")
    assert (p["creative_b"][0] if p["label"][0] == "B" else p["creative_a"][0]) == 3


def test_pairs_randomise_the_order_split_by_product_and_accept_event_logs(world):
    p = build_pairs(world.log, PairConfig(seed=1))
    assert 0.35 < float((p["label"] == "A").mean()) < 0.65
    by_product = p.group_by("product_id").agg(pl.col("split").n_unique())
    assert (by_product["split"] == 1).all()
    # one row per impression gives the same pairs as the aggregated log
    small = _log([(0, 0, 0, 1200, 80), (0, 0, 1, 1500, 30)])
    events = pl.DataFrame({
        "product_id": [0] * 2700, "context_id": [0] * 2700, "creative_id": [0] * 1200 + [1] * 1500,
        "clicked": [1] * 80 + [0] * 1120 + [1] * 30 + [0] * 1470})
    a, b = build_pairs(small, PairConfig(split=(1, 0, 0))), build_pairs(events, PairConfig(split=(1, 0, 0)))
    assert a.equals(b)


@pytest.mark.parametrize("change, column", [
    (lambda d: d.drop("clicks"), "clicks"),
    (lambda d: d.with_columns(pl.when(pl.int_range(pl.len()) == 2).then(None).otherwise(pl.col("creative_id"))
                              .alias("creative_id")), "creative_id"),
    (lambda d: d.with_columns(pl.when(pl.int_range(pl.len()) == 1).then(9999).otherwise(pl.col("clicks"))
                              .alias("clicks")), "clicks"),
    (lambda d: d.with_columns(pl.col("impressions").cast(pl.Float64)), "impressions"),
])
def test_bad_logs_name_the_column_and_row(change, column):
    log = _log([(0, 0, 0, 2000, 100), (0, 0, 1, 2000, 60), (0, 0, 2, 2000, 64)])
    with pytest.raises(ContractError) as e:
        build_pairs(change(log), source="clicks.parquet")
    assert e.value.column == column and "clicks.parquet" in str(e.value)


def test_rationale_is_well_formed_consistent_and_swaps():
    a = {"framing": "close", "background": "white", "brightness": "normal", "clutter": "none", "text": "banner",
         "shown_colour": "red"}
    b = {"framing": "far", "background": "scene", "brightness": "dark", "clutter": "heavy", "text": "none",
         "shown_colour": "blue"}
    ua = {"relevance": 0.5, "text": 0.6, "layout": 0.0, "subject": 0.3, "background": 0.0}
    ub = {"relevance": -0.5, "text": 0.0, "layout": -0.6, "subject": -0.8, "background": -0.2}
    t = rationale(a, b, ua, ub, "deal", "red", "A")
    assert parse(t).well_formed and parse(t).answer == "A"
    assert "verdict : A on subject , relevance , text ." in t  # largest contributions first
    assert "text : A sale banner , B no text -> A ." in t
    s = swap_text(t)
    assert parse(s).answer == "B" and "text : B sale banner , A no text -> B ." in s
    assert parse("<think> x </think> <answer> b </answer>").answer == "B"  # lower-casing tokenizers
    assert not parse("<answer> A </answer>").well_formed and parse("<answer> A </answer>").answer == "A"
    assert parse("<think> </think> <answer> A </answer>").well_formed is False  # empty reasoning
    assert parse("no tags").answer is None


def test_rewards_score_format_and_correctness():
    texts = ["<think> a </think> <answer> A </answer>", "<think> a </think> <answer> B </answer>",
             "<answer> A </answer>", "garbage"]
    r, fmt, acc = rewards(texts, ["A", "A", "A", "A"], w_format=0.2, w_accuracy=1.0)
    np.testing.assert_allclose(r, [1.2, 0.2, 1.0, 0.0])
    assert list(fmt) == [1, 1, 0, 0] and list(acc) == [1, 0, 1, 0]


def test_group_advantages_and_grpo_objective_match_a_reference_loop():
    torch.manual_seed(0)
    r = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.2, 0.2, 0.2, 0.2])
    adv = group_advantages(r, 4)
    g0 = r[:4]
    np.testing.assert_allclose(adv[:4], (g0 - g0.mean()) / (g0.std() + 1e-4), rtol=1e-6)
    assert torch.all(adv[4:] == 0)  # a flat group carries no signal
    n, t = 8, 5
    logp, old, ref = (torch.randn(n, t) * 0.3 - 1 for _ in range(3))
    mask = torch.ones(n, t, dtype=torch.bool)
    mask[0, 3:] = False
    mask[5, 1:] = False
    for agg in ("seq_mean", "token_mean"):
        loss, kl, ratio = grpo_objective(logp, old, ref, adv, mask, clip_eps=0.2, kl_beta=0.1, agg=agg)
        seq_losses, tok_sum, tok_n = [], 0.0, 0
        for i in range(n):
            terms = []
            for j in range(t):
                if not mask[i, j]:
                    continue
                rho = float(np.exp(float(logp[i, j] - old[i, j])))
                a = float(adv[i])
                pg = -min(rho * a, min(max(rho, 0.8), 1.2) * a)
                d = float(ref[i, j] - logp[i, j])
                terms.append(pg + 0.1 * (np.exp(d) - d - 1))
            seq_losses.append(np.mean(terms))
            tok_sum, tok_n = tok_sum + sum(terms), tok_n + len(terms)
        want = np.mean(seq_losses) if agg == "seq_mean" else tok_sum / tok_n
        assert float(loss) == pytest.approx(want, rel=1e-5)
    # at the reference policy the KL term vanishes; gradients push up positive-advantage tokens
    lp = logp.clone().requires_grad_(True)
    loss, kl, _ = grpo_objective(lp, lp.detach(), lp.detach(), adv, mask, 0.2, 0.1)
    assert float(kl.detach().abs().max()) < 1e-6
    loss.backward()
    assert lp.grad[0, 0] < 0 and lp.grad[1, 0] > 0  # adv[0] > 0 > adv[1]


def _tiny_selector(seed=0):
    torch.manual_seed(seed)
    vocab = WordVocab.from_texts(["query : red dress . <think> a b c </think> <answer> A B </answer>"])
    m = SmallSelector(vocab, image_dim=6, image_tokens=2, d_model=16, n_layers=2, n_heads=2, dropout=0.0,
                      max_prompt=6, max_completion=12, image_grid=None)
    return m.eval(), vocab


def _tiny_prompt(b=3):
    g = torch.Generator().manual_seed(1)
    ids = torch.tensor([[4, 5, 6, 0, 0, 0]] * b)
    return SmallPrompt(torch.randn(b, 2, 6, generator=g), torch.randn(b, 2, 6, generator=g), ids, ids > 0)


def test_kv_cache_decoding_matches_the_full_forward():
    m, _ = _tiny_selector()
    p = _tiny_prompt()
    ids, mask = m.generate(p, max_new_tokens=10, greedy=True)
    logits = m.logits(p, ids, mask)
    assert torch.equal(logits.argmax(-1)[mask], ids[mask])
    # sampling: the sampled tokens' log-probs are finite and masked after the end token
    s_ids, s_mask = m.generate(p.repeat(4), max_new_tokens=10, temperature=1.0)
    lp = m.token_logprobs(p.repeat(4), s_ids, s_mask)
    assert torch.isfinite(lp).all() and (lp[~s_mask] == 0).all()


def test_sft_steps_teach_the_small_selector_a_completion():
    m, vocab = _tiny_selector()
    m.train()
    p = _tiny_prompt(2)
    targets = ["<think> a b </think> <answer> A </answer>", "<think> c </think> <answer> B </answer>"]
    ids, mask = m.encode(targets)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(150):
        loss = -m.token_logprobs(p, ids, mask).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    out, omask = m.generate(p, max_new_tokens=12, greedy=True)
    assert m.decode(out, omask) == targets


def test_selection_metrics_by_hand():
    first = np.array([1, 0, 1, -1])
    first_swapped = np.array([1, 1, 0, 1])
    wins = np.array([1, 1, 0, 1])
    gap = np.array([0.7, 1.5, 3.0, 0.9])
    m = selection_metrics(first, first_swapped, wins, gap)
    assert m["accuracy_first_order"] == 0.25          # only pair 0
    assert m["accuracy"] == pytest.approx((0.25 + 1.0) / 2)  # the swapped order gets all four
    assert m["consistency"] == 0.25                    # pair 0 (pair 3 unanswered once)
    assert m["n_gap_0.6-1"] == 2 and m["accuracy_gap_0.6-1"] == pytest.approx((0.5 + 1.0) / 2)
    assert m["n_gap_>2"] == 1 and m["accuracy_gap_>2"] == 0.5


def test_rationale_agreement_scores_each_aspect_clause():
    from ctr.creative.evaluate import clauses, rationale_agreement

    ref = ("<think> intent : deal . relevance : A shows red , B shows blue ; query red -> A . "
           "text : A sale banner , B no text -> A . verdict : A on text . </think> <answer> A </answer>")
    assert clauses(ref)["text"] == "A sale banner , B no text -> A" and clauses("<answer> A </answer>") == {}
    got = rationale_agreement([ref.replace("sale banner", "dense text"), ref], [ref, ref])
    assert got == {"clause_intent": 1.0, "clause_relevance": 1.0, "clause_text": 0.5}


def test_image_tokens_pool_to_a_grid_plus_their_mean():
    vocab = WordVocab(["a"])
    m = SmallSelector(vocab, image_dim=3, image_tokens=16, d_model=8, n_layers=1, n_heads=2, image_grid=2)
    x = torch.arange(16 * 3, dtype=torch.float32).view(1, 16, 3)
    out = m.pool(x)
    assert out.shape == (1, 5, 3)
    grid = x.view(1, 4, 4, 3)
    torch.testing.assert_close(out[0, 0], grid[0, :2, :2].reshape(4, 3).mean(0))   # top-left 2x2 block
    torch.testing.assert_close(out[0, 3], grid[0, 2:, 2:].reshape(4, 3).mean(0))   # bottom-right
    torch.testing.assert_close(out[0, 4], x[0].mean(0))
    with pytest.raises(ValueError, match="square token grid"):
        SmallSelector(vocab, image_dim=3, image_tokens=9, image_grid=2)
