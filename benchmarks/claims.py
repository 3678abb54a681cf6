"""The paper's claims, each settled on three datasets and three training seeds from the recipe's quality tables.

    python benchmarks/claims.py --out benchmarks/results/claims.json

Reads ``benchmarks/results/recipe/quality_DATASET_sSEED[_VARIANT].json`` (written by ``benchmarks/quality.py``, the
library's defaults as they stood; each row records its git commit). Each claim compares two rows, A (what the paper
says is better) and B, on SciFact, NFCorpus and the SQuAD article split:

* ``a``: embedding matching + score distillation (``mpnet-2L-asym/embeddistill``) against score distillation alone
  (``mpnet-2L-asym/score-only``);
* ``b``: with generated queries (the default tables) against without (``..._nogen.json``: ``crops_per_document`` and
  ``perturbations_per_query`` 0, the labelled training queries alone);
* ``c``: an asymmetric student (``minilm-asym``: the teacher's document tower) against a symmetric one with the same
  query encoder (``minilm-sym``); both as the library's defaults train them, and the symmetric one also before its
  averaging with the start (``start_weight`` 0, from its row's sweep), which is the like-for-like reading;
* ``d``: a dual-pooling against a standard cross-encoder teacher, from ``--cross-encoder``
  (``benchmarks/results/cross_encoder_claims.json``, written by ``benchmarks/cross_encoder.py``: both CEs trained
  from one base on the same data, one dual-encoder student per seed from each): the dual-pooling CE's student
  trained with score distillation + embedding matching against the standard CE's student with score distillation
  only (it has no embeddings). Each set also lists both rerankers' own nDCG@10, and ``d.extra`` two comparisons
  outside the verdict: the teacher alone (both students score distillation only) and embedding matching alone
  (the dual-pooling CE's two students). "not run" while that file is absent.

Per claim and dataset: each side's seed mean and standard deviation of nDCG@10, and a paired permutation test on
per-query nDCG@10 averaged over the seeds both sides have, Holm-corrected over every test of a-c in the file (d's
tests, from another experiment, over d's sets; each extra comparison over its own sets). Verdict:
``confirmed`` when A is significantly better on most of the sets and B on none, ``refuted`` when B is on most and A on
none, ``mixed`` otherwise (significant both ways, on a minority of the sets only, or on none); ``unsettled`` while a
claim has fewer than 3 seeds on any of the 3 sets (the reasoning then says what the seeds so far show).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

import numpy as np
from _common import REPO, decode_values, git_commit
from headline import METRIC, holm, per_query, seed_averaged

from embeddistill.evaluation.significance import paired_permutation_test
from embeddistill.storage import atomic_write_json

DATASETS = ("scifact", "nfcorpus", "squad")
SEEDS = (42, 43, 44)
ALPHA = 0.05

# claim: (statement, (A's table variant, A's row, A's sweep weight), (B's ...))
CLAIMS = {
    "a": (
        "embedding matching + score distillation beats score distillation alone (mpnet-2L-asym)",
        ("", "mpnet-2L-asym/embeddistill", None),
        ("", "mpnet-2L-asym/score-only", None),
    ),
    "b": (
        "generated queries help (mpnet-2L-asym, with against without crops and perturbed copies)",
        ("", "mpnet-2L-asym/embeddistill", None),
        ("_nogen", "mpnet-2L-asym/embeddistill", None),
    ),
    "c": (
        "an asymmetric student beats a symmetric one with the same query encoder (all-MiniLM-L6-v2, as defaults train "
        "each: the symmetric one averaged with its start)",
        ("", "minilm-asym/embeddistill", None),
        ("", "minilm-sym/embeddistill", None),
    ),
    "c_like_for_like": (
        "the same as c, the symmetric student as distillation left it (start_weight 0)",
        ("", "minilm-asym/embeddistill", None),
        ("", "minilm-sym/embeddistill", "0"),
    ),
}
NOT_RUN = {
    "d": "a dual-pooling cross-encoder teacher gives a better dual-encoder student than a standard one: not run here. "
    "Both teachers must first be trained (embeddistill train-teacher --architecture dual-pooling / standard) from "
    "one base, which needs GPU time this round's budget did not cover; no cross-encoder checkpoint is obtainable "
    "offline."
}
CROSS_ENCODER_FILE = REPO / "benchmarks" / "results" / "cross_encoder_claims.json"
SCORE_ONLY, WITH_EM = "score distillation only", "score distillation + embedding matching"
# d: (statement, A (teacher architecture, student variant), B); its extra comparisons likewise (outside the verdict)
CLAIM_D = (
    "a dual-pooling cross-encoder teacher gives a better dual-encoder student (score distillation + embedding "
    "matching) than a standard cross-encoder (score distillation only: it has no embeddings), both CEs trained from "
    "one base on the same data",
    ("dual-pooling", WITH_EM),
    ("standard", SCORE_ONLY),
)
D_EXTRA = {
    "teacher_alone": (
        "the teacher alone: both students score distillation only (dual-pooling against standard CE)",
        ("dual-pooling", SCORE_ONLY),
        ("standard", SCORE_ONLY),
    ),
    "embedding_matching_alone": (
        "embedding matching alone: the dual-pooling CE's students with against without it",
        ("dual-pooling", WITH_EM),
        ("dual-pooling", SCORE_ONLY),
    ),
}


def side_scores(folder: Path, dataset: str, side: tuple) -> dict[int, dict[str, float]]:
    """``{seed: {query: nDCG@10}}`` of one side of a claim on one dataset's test split."""
    variant, key, weight = side
    found = {}
    for seed in SEEDS:
        path = folder / f"quality_{dataset}_s{seed}{variant}.json"
        if not path.exists():
            continue
        table = json.loads(path.read_text(encoding="utf-8"))
        row = table["rows"].get(key)
        if row is not None and weight is not None:
            row = row.get("start_weight_sweep", {}).get(weight)
        if row is not None:
            found[seed] = per_query(row, "test", table["query_ids"]["test"])
    return found


def compare(folder: Path, a: tuple, b: tuple, rounds: int) -> dict[str, dict]:
    found = {dataset: (side_scores(folder, dataset, a), side_scores(folder, dataset, b)) for dataset in DATASETS}
    return compare_found(found, rounds)


def compare_found(found: dict[str, tuple[dict, dict]], rounds: int) -> dict[str, dict]:
    """Per dataset, from ``{dataset: ({seed: {query: nDCG@10}} of A, the same of B)}``: each side's seed mean and sd
    over the seeds both have, the mean per-query difference and its paired p-value (seed-averaged per query)."""
    compared = {}
    for dataset, (side_a, side_b) in found.items():
        seeds = sorted(set(side_a) & set(side_b))
        if not seeds:
            continue
        means = {
            name: [float(np.mean(list(side[s].values()))) for s in seeds]
            for name, side in (("a", side_a), ("b", side_b))
        }
        ours = seed_averaged({s: side_a[s] for s in seeds})
        theirs = seed_averaged({s: side_b[s] for s in seeds})
        compared[dataset] = {
            "seeds": seeds,
            **{f"{name}_mean": float(np.mean(v)) for name, v in means.items()},
            **{f"{name}_sd": float(statistics.stdev(v)) if len(v) > 1 else 0.0 for name, v in means.items()},
            "difference": float(np.mean([ours[q] - theirs[q] for q in ours])),
            "p": paired_permutation_test(ours, theirs, rounds=rounds),
        }
    return compared


def verdict(per_dataset: dict[str, dict]) -> tuple[str, str]:
    better = [d for d, r in per_dataset.items() if r["p_holm"] < ALPHA and r["difference"] > 0]
    worse = [d for d, r in per_dataset.items() if r["p_holm"] < ALPHA and r["difference"] < 0]
    unclear = ", ".join(
        f"{d} {r['difference']:+.4f}" for d, r in per_dataset.items() if d not in better and d not in worse
    )
    most = len(per_dataset) / 2
    if len(better) > most and not worse:
        return "confirmed", f"A is significantly better on {', '.join(better)} and significantly worse nowhere."
    if len(worse) > most and not better:
        return "refuted", f"B is significantly better on {', '.join(worse)} and A significantly better nowhere."
    if better and worse:
        return "mixed", f"A is significantly better on {', '.join(better)}, B on {', '.join(worse)}."
    if better or worse:
        side = f"A is significantly better on {', '.join(better)}" if better else f"B on {', '.join(worse)}"
        return "mixed", f"{side} only; no significant difference on the other sets (mean differences: {unclear})."
    return "mixed", f"no set shows a significant difference after Holm (mean differences: {unclear})."


def settled(per_dataset: dict[str, dict]) -> tuple[str, str, int]:
    """Verdict, reasoning and the fewest seeds of a set; ``unsettled`` with fewer than 3 seeds on 3 sets."""
    decided, reason = verdict(per_dataset)
    seeds = sorted({len(r["seeds"]) for r in per_dataset.values()})
    if len(per_dataset) < len(DATASETS) or not seeds or seeds[0] < len(SEEDS):
        # Seed noise is as large as most gaps: fewer than 3 seeds on 3 sets settles nothing.
        decided, reason = "unsettled", f"fewer than {len(SEEDS)} seeds on {len(DATASETS)} sets so far; {reason}"
    return decided, reason, seeds[0] if seeds else 0


def with_holm(per_dataset: dict[str, dict]) -> dict[str, dict]:
    adjusted = holm({dataset: r["p"] for dataset, r in per_dataset.items()})
    for dataset, result in per_dataset.items():
        result["p_holm"] = adjusted[dataset]
    return per_dataset


def ce_scores(data: dict, dataset: str, side: tuple[str, str]) -> dict[int, dict[str, float]]:
    """``{seed: {query: nDCG@10}}`` of one teacher's student variant on one dataset of a cross-encoder result file."""
    entry = data["datasets"][dataset]
    architecture, variant = side
    rows = entry["teachers"].get(architecture, {}).get("students", {}).get(variant, {})
    return {
        int(seed): dict(zip(entry["query_ids"], decode_values(row["per_query"][METRIC]), strict=True))
        for seed, row in rows.items()
    }


def ce_order(data: dict) -> list[str]:
    return [d for d in DATASETS if d in data["datasets"]] + sorted(set(data["datasets"]) - set(DATASETS))


def ce_side(side: tuple[str, str]) -> dict:
    return {"table": CROSS_ENCODER_FILE.name, "row": f"{side[0]} CE -> {side[1]}", "teacher": side[0]}


def ce_comparison(data: dict, statement: str, a: tuple, b: tuple, rounds: int) -> dict:
    found = {dataset: (ce_scores(data, dataset, a), ce_scores(data, dataset, b)) for dataset in ce_order(data)}
    per_dataset = with_holm(compare_found(found, rounds))
    return {"claim": statement, "a": ce_side(a), "b": ce_side(b), "datasets": per_dataset}


def claim_d(path: Path, rounds: int) -> dict | None:
    """Claim d from a ``cross_encoder.py`` result file (None where it is absent): the comparison with its verdict,
    both rerankers' nDCG@10 per set for context, and the extra comparisons (no verdict)."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    if any("teachers" not in entry for entry in data.get("datasets", {}).values()):
        why = "one dual-pooling CE's rows (the layout before per-teacher results)"
        raise SystemExit(f"{path}: {why}; claim d needs a benchmarks/cross_encoder.py file with both teachers")
    statement, a, b = CLAIM_D
    claim = ce_comparison(data, statement, a, b, rounds)
    decided, reason, seeds = settled(claim["datasets"])
    rerankers = {
        dataset: {
            architecture: teacher["cross_encoder_reranker"]["metrics"][METRIC]
            for architecture, teacher in data["datasets"][dataset]["teachers"].items()
        }
        for dataset in claim["datasets"]
    }
    extra = {name: ce_comparison(data, *spec, rounds) for name, spec in D_EXTRA.items()}
    for comparison in extra.values():
        comparison["seeds"] = min((len(r["seeds"]) for r in comparison["datasets"].values()), default=0)
    return {
        **claim,
        "seeds": seeds,
        "verdict": decided,
        "reasoning": reason,
        "rerankers": rerankers,
        "extra": extra,
        "source": {"file": str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)}
        | {k: data.get(k) for k in ("command", "git_commit")},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tables", default=str(REPO / "benchmarks" / "results" / "recipe"))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "claims.json"))
    parser.add_argument("--cross-encoder", default=str(CROSS_ENCODER_FILE), help="claim d's cross_encoder.py file")
    parser.add_argument("--permutation-rounds", type=int, default=10000)
    args = parser.parse_args(argv)
    folder = Path(args.tables)
    compared = {name: compare(folder, a, b, args.permutation_rounds) for name, (_, a, b) in CLAIMS.items()}
    adjusted = holm({f"{n}|{d}": r["p"] for n, per in compared.items() for d, r in per.items()})
    claims = {}
    for name, (statement, a, b) in CLAIMS.items():
        per_dataset = compared[name]
        for dataset, result in per_dataset.items():
            result["p_holm"] = adjusted[f"{name}|{dataset}"]
        decided, reason, seeds = settled(per_dataset)
        claims[name] = {
            "claim": statement,
            "a": {"table": a[0] or "default", "row": a[1], **({"start_weight": a[2]} if a[2] else {})},
            "b": {"table": b[0] or "default", "row": b[1], **({"start_weight": b[2]} if b[2] else {})},
            "datasets": per_dataset,
            "seeds": seeds,
            "verdict": decided,
            "reasoning": reason,
        }
    for name, why in NOT_RUN.items():
        statement, _, reason = why.partition(": ")
        claims[name] = {"claim": statement, "verdict": "not run", "reasoning": reason, "datasets": {}, "seeds": 0}
    d = claim_d(Path(args.cross_encoder), args.permutation_rounds)
    if d is not None:
        claims["d"] = d
    atomic_write_json(
        args.out,
        {
            "command": "python benchmarks/claims.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "date": datetime.date.today().isoformat(),
            "metric": f"{METRIC} on each dataset's test split",
            "significance": "paired permutation test on per-query values averaged over seeds, Holm over a-c's tests "
            "(d's over its sets)",
            **claims,
            "git_commit": git_commit(),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
