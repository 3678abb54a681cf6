"""``benchmarks/report.py``'s renderers of the other known result files (quickstart, ablation, defaults, ANN,
ONNX, serving, distributed, query generation, cross-encoders, speed), and the table ``KNOWN`` that names each
file's section; a renderer that meets a changed layout raises and the report falls back to generic tables.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path

from _report_format import FRONTIER_CHART, fmt, millions, p_value, percent, table, times
from _report_recipe import render_claims, render_start_weight


def render_quickstart(data: dict) -> list[str]:
    teacher, student = data["teacher"], data["student"]
    metrics = [m for m in ("nDCG@10", "RR@10", "R@100") if m in teacher]
    header = ["", *metrics, "CPU ms batch 1", "CPU ms batch 32", "query-encoder params"]

    def row(name: str, side: dict) -> list[str]:
        latency = side.get("latency", {})
        return [
            name,
            *(fmt(side[m]) for m in metrics),
            fmt(latency.get("batch1_ms")),
            fmt(latency.get("batch32_ms")),
            millions(side.get("query_encoder_parameters")),
        ]

    retention = data.get("retention", {})
    speedup = data.get("speedup", {})
    ratio = [
        "student / teacher",
        *(percent(retention.get(m)) for m in metrics),
        times(speedup.get("batch1")) + " faster",
        times(speedup.get("batch32")) + " faster",
        "",
    ]
    lines = [
        f"Teacher `{teacher.get('model')}`, student `{student.get('model')}` (asymmetric "
        f"{student.get('asymmetric')}), {data.get('eval_queries')} {data.get('eval_split')} queries; training "
        f"queries {data.get('training_queries')}.",
        "",
    ]
    return lines + table(header, [row("teacher", teacher), row("student", student), ratio])


def render_ablation(data: dict) -> list[str]:
    teacher = data["teacher"]
    metrics = list(teacher)
    first = metrics[0]
    body = [["teacher", *(fmt(teacher[m]) for m in metrics), "100%", ""]]
    for name, row in data["rows"].items():
        p = row.get("p_value_vs_embeddistill", {}).get(first)
        body.append([name, *(fmt(row["metrics"][m]) for m in metrics), percent(row["retention"][first]), p_value(p)])
    lines = [f"Device {data.get('device')}.", ""]
    lines += table(["method", *metrics, f"retention {first}", f"p vs EmbedDistill ({first})"], body)
    if data.get("peer_errors"):
        lines += [f"Peer errors: {fmt(data['peer_errors'])}", ""]
    return lines


def render_defaults(data: dict) -> list[str]:
    lines = [fmt(data.get("purpose")) + f"; teacher {data.get('teacher')}, student {data.get('student')}.", ""]
    if data.get("summary"):  # many calls of one point each: one table of points, then the commands
        return lines + render_defaults_summary(data)
    for call in data.get("calls", []):
        lines += [f"`{call.get('command')}` ({call.get('date')}):", ""]
        body = [
            [
                Path(str(r.get("dataset"))).name,
                fmt(r.get("options") or "base"),
                fmt(r.get("teacher_nDCG@10")),
                fmt(r.get("student_nDCG@10")),
                percent(r.get("retention_nDCG@10")),
            ]
            for r in call.get("results", [])
        ]
        lines += table(["dataset", "options", "teacher nDCG@10", "student nDCG@10", "retention"], body)
    if data.get("chosen"):
        lines += [f"Chosen: {fmt(data['chosen'])}.", ""]
    return lines


def render_defaults_summary(data: dict) -> list[str]:
    datasets = sorted({dataset for point in data["summary"] for dataset in point["retention_nDCG@10"]})
    body = [
        [
            fmt(point["options"] or "base"),
            *(percent(point["retention_nDCG@10"].get(dataset)) for dataset in datasets),
            percent(point["mean_retention_nDCG@10"]),
            fmt(point["runs"]),
            ", ".join(f"{d} {percent(low)} to {percent(high)}" for d, (low, high) in point.get("spread", {}).items()),
        ]
        for point in data["summary"]
    ]
    header = ["options", *(f"{d} retention" for d in datasets), "mean", "runs", "spread of the runs"]
    lines = ["Retention of the teacher's nDCG@10 on the held-out queries (mean over runs):", ""]
    lines += table(header, body)
    if data.get("chosen") is not None:
        lines += [f"Chosen: {fmt(data['chosen'] or 'base')}.", ""]
    lines += ["Commands:", ""] + [f"    {call['command']}" for call in data.get("calls", [])] + [""]
    return lines


def render_ann(data: dict) -> list[str]:
    lines = [
        f"{data.get('documents')} documents, {data.get('queries')} queries, teacher `{data.get('teacher')}`, "
        f"k={data.get('k')}, nDCG on `{data.get('nDCG_split')}`.",
        "",
    ]
    body = [
        [
            r.get("type"),
            fmt(r.get("params") or ""),
            fmt(r.get("recall@10")),
            fmt(r.get("nDCG@10")),
            fmt(r.get("search_ms_per_query")),
            fmt(r.get("build_seconds")),
        ]
        for r in data.get("results", [])
    ]
    return lines + table(["index", "parameters", "recall@10", "nDCG@10", "search ms/query", "build s"], body)


def render_onnx(data: dict) -> list[str]:
    lines = [
        f"Max abs difference ONNX vs PyTorch {fmt(data.get('max_abs_diff'))}, identical top-10 on "
        f"{data.get('identical_top10')} of {data.get('queries')} queries.",
        "",
    ]
    body = [
        [batch, fmt(v.get("pytorch_ms")), fmt(v.get("onnxruntime_ms")), times(v.get("speedup"))]
        for batch, v in data.get("latency", {}).items()
    ]
    return lines + table(["batch", "PyTorch ms", "ONNX Runtime ms", "speed-up"], body)


def render_serve(data: dict) -> list[str]:
    body = [
        [
            name,
            fmt(r.get("query_model")),
            fmt(r.get("throughput_rps")),
            fmt(r.get("latency_ms", {}).get("p50")),
            fmt(r.get("latency_ms", {}).get("p99")),
        ]
        for name, r in data.get("results", {}).items()
    ]
    setup = data.get("setup", {})
    lines = [
        f"{setup.get('requests')} requests x {setup.get('rounds')} rounds at concurrency "
        f"{setup.get('concurrency')}, {setup.get('index_type')} index of {setup.get('documents')} documents.",
        "",
    ]
    lines += table(["query model", "path", "requests/s", "p50 ms", "p99 ms"], body)
    same = data.get("same_backend")
    if same:
        body = [
            [name, times(r["throughput_ratio"]), times(r["p50_speedup"]), times(r["p99_speedup"])]
            for name, r in same.items()
        ]
        lines += ["Student against teacher in the same backend:", ""]
        lines += table(["backend", "throughput ratio", "p50 speed-up", "p99 speed-up"], body)
    return lines


def render_distributed(data: dict) -> list[str]:
    body = [
        [name, fmt(r.get("train", {}).get("queries_per_second")), fmt(r.get("encode", {}).get("documents_per_second"))]
        for name, r in data.get("runs", {}).items()
    ]
    lines = [f"Device {data.get('device')}; scaling {fmt(data.get('scaling'))}.", ""]
    return lines + table(["run", "training queries/s", "teacher documents/s"], body)


def render_symmetric_documents(data: dict) -> list[str]:
    ways = {
        "padded_batch": "one padded batch, tokenized each step",
        "sorted_chunks_cached_tokens": "sorted chunks, cached",
    }
    body = [
        [
            label,
            fmt(data[key]["tokenize_seconds"]),
            fmt(data[key]["forward_backward_seconds"]),
            f"{data[key]['tokens_run']:,}",
        ]
        for key, label in ways.items()
    ]
    lengths = data["token_lengths"]
    lines = [
        f"{data['documents']} {data['dataset']} passages (mean {fmt(lengths['mean'])} tokens, longest "
        f"{lengths['max']}), {data['student']}, forward and backward on the CPU; median seconds.",
        "",
    ]
    closing = [
        f"Speed-up {times(data['speedup'])}; largest embedding difference {fmt(data['max_abs_embedding_difference'])}.",
        "",
    ]
    return lines + table(["documents", "tokenize s", "forward+backward s", "tokens run"], body) + closing


def render_querygen(data: dict) -> list[str]:
    runs = [*data.get("runs", {}).values(), data.get("throughput", {})]
    lines = [f"`{run['command']}` ({run.get('device')}, {run.get('date')})" for run in runs if run.get("command")]
    lines = ["Made by:", "", *(f"- {line}" for line in lines), ""]
    for dataset, section in data.items():
        if not isinstance(section, dict) or "rows" not in section:
            continue
        teacher = section["teacher"]
        lines += [f"### {dataset} (teacher nDCG@10 {fmt(teacher['nDCG@10'])})", ""]
        body = [
            [
                name,
                fmt(row["training_queries"].get("generated")),
                fmt(row["metrics"]["nDCG@10"]),
                percent(row["retention"]["nDCG@10"]),
                p_value(row.get("p_value_vs_none", {}).get("nDCG@10")),
            ]
            for name, row in section["rows"].items()
        ]
        lines += table(["training queries", "generated", "nDCG@10", "retention", "p vs none"], body)
        if section.get("sparse"):
            sparse = section["sparse"]
            lines += [
                f"Sparse ({percent(sparse['train_query_fraction'])} of the labelled queries): retention "
                f"{percent(sparse['retention_without_generated'])} without generated queries, "
                f"{percent(sparse['retention_with_generated'])} with them; generation recovers "
                f"{percent(sparse['gap_recovered'])} of the gap to the full-data run.",
                "",
            ]
    generators = data.get("throughput", {}).get("generators", {})
    if generators:
        lines += ["### Generation throughput", "", f"On {data['throughput'].get('device')}.", ""]
        body = [[name, fmt(g["queries_per_second"]), fmt(g.get("settings", ""))] for name, g in generators.items()]
        lines += table(["generator", "queries/s", "settings"], body)
    return lines


def render_cross_encoder(data: dict) -> list[str]:
    """Per dataset: the first stage, the CE reranker(s) and the students; either layout (one dual-pooling CE with a
    row per variant, or per teacher with a row per variant and seed: seed mean ± sd)."""
    device = data.get("device") or "; ".join(sorted({str(c.get("device")) for c in data.get("calls", [])}))
    lines = [f"Device {device}.", ""]
    for dataset, section in data["datasets"].items():
        if "teachers" in section:
            lines += [f"### {dataset}", ""] + _cross_encoder_teachers(section)
            continue
        reranker = section["cross_encoder_reranker"]["metrics"]
        body = [
            ["first stage", fmt(section["first_stage"]["metrics"]["nDCG@10"]), ""],
            ["cross-encoder reranking the top 100", fmt(reranker["nDCG@10"]), "100%"],
        ]
        body += [
            [name, fmt(row["metrics"]["nDCG@10"]), percent(row["retention_vs_cross_encoder"]["nDCG@10"])]
            for name, row in section["rows"].items()
        ]
        lines += [f"### {dataset}", ""] + table(["system", "nDCG@10", "of the reranker"], body)
    return lines


def _cross_encoder_teachers(section: dict) -> list[str]:
    body = [["first stage", fmt(section["first_stage"]["metrics"]["nDCG@10"]), "", ""]]
    for teacher, found in section["teachers"].items():
        reranker = found["cross_encoder_reranker"]["metrics"]["nDCG@10"]
        body.append([f"{teacher} CE reranking the first stage", fmt(reranker), "100%", ""])
        before = found.get("student_before_distillation")
        if before:
            body.append([f"{teacher} CE: student before distillation", fmt(before["metrics"]["nDCG@10"]), "", ""])
        for variant, by_seed in found["students"].items():
            values = [row["metrics"]["nDCG@10"] for row in by_seed.values()]
            mean, sd = statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0
            body.append(
                [f"{teacher} CE: {variant}", f"{fmt(mean)} ± {fmt(sd)}", percent(mean / reranker), str(len(values))]
            )
    return table(["system", "nDCG@10 (seed mean ± sd)", "of its reranker", "seeds"], body)


def render_speed_cpu(data: dict) -> list[str]:
    lines = [f"{fmt(data.get('machine'))}; {fmt(data.get('latency_method'))}", ""]
    header = [
        "query encoder",
        "CPU ms batch 1",
        "CPU ms batch 32",
        "GFLOP/query",
        "params (w/o embeddings)",
        "peak MiB",
    ]
    body = [
        [
            name,
            fmt(e["batch1_ms"]),
            fmt(e["batch32_ms"]),
            fmt(e["flops_per_query"] / 1e9),
            f"{millions(e['parameters'])} ({millions(e['parameters_without_embeddings'])})",
            fmt(e["memory"]["peak_rss_growth_mib"]),
        ]
        for name, e in data["encoders"].items()
    ]
    return lines + table(header, body) + render_smallest_same_backend(data)


def render_smallest_same_backend(data: dict) -> list[str]:
    """The smallest student against the teacher in the same backend and precision, interleaved (``smallest``)."""
    smallest, teacher, run = data.get("smallest"), data.get("teacher_same_backend"), data.get("smallest_run", {})
    if not smallest or not teacher:
        return []
    speedups = smallest["speedup_vs_teacher_same_backend"]
    body = [
        [
            backend,
            f"{fmt(smallest[backend]['batch1_ms'])} ({fmt(smallest[backend]['batch1_p10_ms'])}-"
            f"{fmt(smallest[backend]['batch1_p90_ms'])})",
            fmt(teacher[backend]["batch1_ms"]),
            times(speedups[f"{backend}.batch1"]),
            fmt(smallest[backend]["batch32_ms"]),
            fmt(teacher[backend]["batch32_ms"]),
            times(speedups[f"{backend}.batch32"]),
            fmt(smallest[backend].get("nDCG@10_ratio_vs_fp32")),
        ]
        for backend in ("pytorch_fp32", "onnx_fp32", "onnx_int8")
        if backend in smallest and backend in teacher
    ]
    header = ["backend", "smallest ms b1 (p10-p90)", "teacher ms b1", "speed-up b1", "smallest ms b32",
              "teacher ms b32", "speed-up b32", "nDCG@10 vs fp32"]  # fmt: skip
    others = [
        f"with {block} call(s) in a row: int8 batch 1 {fmt(other['smallest']['onnx_int8']['batch1_ms'])} ms against "
        f"the teacher's {fmt(other['teacher']['onnx_int8']['batch1_ms'])} ms"
        for block, other in smallest.get("other_blocks", {}).items()
    ]
    kept = smallest.get("parity", {}).get("kept_from")
    return [
        "",
        f"The smallest student (2-layer MiniLM + projection) and the teacher in the same backend and precision, "
        f"interleaved on the same batches, each encoder making {fmt(smallest.get('block', 1))} call(s) in a row: "
        f"`{fmt(run.get('command'))}` (commit {fmt(run.get('git_commit'))}; load "
        f"before {fmt(run.get('load_average_1_5_15_before'))}). Retrieval parity of int8: "
        f"{fmt(smallest.get('parity', {}).get('model'))} on SciFact test"
        + (f", from `{fmt(kept.get('command'))}` (commit {fmt(kept.get('git_commit'))})" if kept else "")
        + "."
        + (f" Also measured {'; '.join(others)}." if others else ""),
        "",
        *table(header, body),
    ]


def render_speed_gpu(data: dict) -> list[str]:
    lines = [
        f"Device {data.get('device')}; measured bf16 matmul peak {fmt(data['bf16_matmul_peak']['tflops'])} TFLOP/s.",
        "",
    ]
    runs = data.get("section_runs", {})
    if len({run.get("git_commit") for run in runs.values()}) > 1:  # sections from different runs: say which is which
        lines += [
            *(
                f"- `{name}`: `{run.get('command')}` at {run.get('git_commit')} ({run.get('date')})"
                for name, run in runs.items()
            ),
            "",
        ]
    body = [
        [name, fmt(r["documents_per_second"]), percent(r["share_of_peak"])]
        for name, r in data["encode"]["runs"].items()
    ]
    lines += table(["teacher encoding", "documents/s", "share of peak"], body)
    body = [
        [name, fmt(r["queries_per_second"]), percent(r["share_of_peak"])] for name, r in data["train"]["runs"].items()
    ]
    lines += table(["training", "queries/s", "share of peak"], body)
    symmetric = data["symmetric"]
    body = [[name, fmt(r["steps_per_second"]), fmt(r["queries_per_second"])] for name, r in symmetric["runs"].items()]
    lines += table(["symmetric training (attention kernels)", "steps/s", "queries/s"], body)
    lines += [
        f"Symmetric: {symmetric['student']}, {symmetric['batch']} queries and about "
        f"{symmetric['candidate_passages_per_step']} candidate passages a step; ours over PyTorch's kernels "
        f"{fmt(symmetric['speedup'])}x.",
        "",
    ]
    dual = data.get("dual_pooling")
    if dual:
        body = [
            [
                way,
                fmt(dual["training"][way]["steps_per_second"]),
                " / ".join(fmt(t) for t in dual["training"][way]["seconds"]),
                fmt(dual["scoring"][way]["pairs_per_second"]),
            ]
            for way in dual["training"]
        ]
        lines += table(
            ["dual-pooling CE (attention kernels)", "training steps/s", "seconds per repeat", "scoring pairs/s"], body
        )
        lines += [
            f"Model: {dual['model']}; {dual['batch']} queries x {dual['group_size']} documents a training "
            f"step ({dual['steps_per_way_and_repeat']} steps a repeat, each way's faster repeat counted), "
            f"{dual['scored_pairs']} pairs scored after an untimed warm-up.",
            "",
        ]
    return lines + [f"Ratios: {fmt(data.get('summary'))}.", ""]


def _headline_rows(students: dict[str, dict]) -> list[list[str]]:
    body = []
    for name, student in students.items():
        seeds = ", ".join(f"{split} {len(s)}" for split, s in student["seeds"].items())
        beats = student.get("beats_off_the_shelf")
        row = student.get("row", name)
        body.append(
            [
                f"`{name}`" if row == name else f"`{name}` (row `{row}`)",
                percent(student.get("retention_mean")) or "not all five sets measured",
                percent(student.get("retention_sd")),
                times(student.get("cpu_speedup_batch1")),
                "" if beats is None else ("yes" if beats else "no"),
                seeds,
            ]
        )
    return body


HEADLINE_HEADER = [
    "student",
    "retention (5-set mean)",
    "sd over seeds",
    "CPU batch-1 speed-up",
    "beats it",
    "seeds per set",
]


def _general_queries(general: dict) -> list[str]:
    """The dev-chosen recipe with general queries: the dev candidates, then the chosen ones on test."""
    dev = general.get("dev", {})
    lines = [
        f"**With general queries** ({general['recipe']}). Chosen on dev (20% of the labelled training queries held "
        "out, seed 42), three-set retention of nDCG@10:",
        "",
    ]
    lines += table(
        ["candidate", "SciFact", "NFCorpus", "SQuAD", "mean"],
        [
            [f"`{name}`", *(percent(v.get(d)) for d in ("scifact", "nfcorpus", "squad", "mean"))]
            for name, v in dev.items()
        ],
    )
    lines += ["Then on test, three seeds (DL: its own tables, whose training queries are these already):", ""]
    return lines + table(HEADLINE_HEADER, _headline_rows(general["students"]))


def render_headline(data: dict) -> list[str]:
    """Each student's five-set retention (library defaults, seed mean) against all-MiniLM-L6-v2 as it comes."""
    shelf = data["off_the_shelf"]["all-MiniLM-L6-v2"]
    lines = [
        f"Teacher mean nDCG@10 {fmt(data['teacher']['mean_nDCG@10'])}; all-MiniLM-L6-v2 as it comes keeps "
        f"{percent(shelf['retention_mean'])}. Tables: {', '.join(data['tables'])}.",
        "",
    ]
    lines += table(HEADLINE_HEADER, _headline_rows(data["students"]))
    lines += [f"- `{name}`: {student['recipe']}" for name, student in data["students"].items() if "recipe" in student]
    lines += [""]
    for name, third in data.get("third_epoch", {}).get("students", {}).items():
        sets = ", ".join(
            f"{split} {t['mean_difference']:+.4f} (p_holm {t['p_holm']:.2f}, {len(t['seeds'])} seeds)"
            for split, t in third["vs_2_epochs"].items()
        )
        by_seed = "; ".join(f"{label}: {fmt(v)}" for label, v in third["three_set_retention_by_seed"].items())
        lines += [f"`{name}` at 3 epochs against 2, nDCG@10 per set: {sets}. Three-set retention by seed: {by_seed}."]
        lines += [""]
    if data.get("first_layers"):
        lines += ["The same students keeping their first two layers (the previous recipe):", ""]
        lines += table(HEADLINE_HEADER, _headline_rows(data["first_layers"]))
    if data.get("with_general_queries"):
        lines += _general_queries(data["with_general_queries"])
    if data.get("dl_at_earlier_recipe"):
        earlier = ", ".join(
            f"`{name}` {percent(e['retention_mean'])}" for name, e in data["dl_at_earlier_recipe"]["students"].items()
        )
        lines += [
            "With DL19 and DL20 as the earlier recipe trained them (2 crops per passage, 6 epochs; `minilm-sym` 1 "
            f"epoch, one seed), the other sets as in the first table: {earlier}.",
            "",
        ]
    label_free = data["label_free"]
    lines += [
        f"Label-free agreement of the weights each run ends with against test retention, {label_free['runs']} "
        f"runs: Spearman {fmt(label_free['spearman_vs_test_retention'])} across sets; within a set "
        f"{fmt(label_free['spearman_within_dataset'])}. Its rise from the run's start, read after the fact: "
        f"{fmt(label_free.get('spearman_gain_vs_test_retention'))} across sets.",
        "",
        *_query_cosine_lines(label_free.get("query_cosine")),
        f"![students against the off-the-shelf frontier](benchmarks/results/{FRONTIER_CHART})",
        "",
    ]
    return lines


def _query_cosine_lines(cosine: dict | None) -> list[str]:
    if not cosine:
        return []
    dev, differ = cosine["dev"], cosine["choices_that_differ"]
    rate, kept = differ["learning_rate"], differ["kept_checkpoint"]
    return [
        "The check's other number, the mean cosine to the teacher's query embeddings, ranks the same runs across sets: "
        f"Spearman {fmt(cosine['spearman_vs_test_retention'])} over {cosine['runs']} runs (within a set "
        f"{fmt(cosine['spearman_within_dataset'])}); on dev retention {fmt(dev['spearman_vs_dev_retention'])} against "
        f"agreement's {fmt(dev['agreement_spearman_vs_dev_retention'])} over {dev['runs']} runs. Choosing by it would "
        f"have changed {rate['differ']} of {rate['runs']} learning-rate choices and {kept['differ']} of {kept['runs']} "
        "kept checkpoints.",
        "",
    ]


KNOWN: dict[str, tuple[str, Callable[[dict], list[str]]]] = {
    "headline.json": ("Headline: the library's defaults against all-MiniLM-L6-v2 as it comes", render_headline),
    "quickstart.json": ("Quickstart", render_quickstart),
    "ablation_scifact.json": ("Ablation (SciFact)", render_ablation),
    "defaults_dev.json": ("Choosing the defaults (held-out training queries)", render_defaults),
    "defaults_dev_smallest.json": ("Options for the smallest student (held-out training queries)", render_defaults),
    "onnx.json": ("ONNX export", render_onnx),
    "serve.json": ("Serving", render_serve),
    "distributed.json": ("Many GPUs", render_distributed),
    "querygen.json": ("Query generation", render_querygen),
    "cross_encoder.json": ("Cross-encoder teachers", render_cross_encoder),
    "cross_encoder_claims.json": ("Cross-encoder teachers: dual-pooling against standard", render_cross_encoder),
    "speed_cpu.json": ("Speed on CPU", render_speed_cpu),
    "speed_gpu.json": ("Speed on GPU", render_speed_gpu),
    "symmetric_documents.json": ("Symmetric training: a step's documents", render_symmetric_documents),
    "start_weight.json": ("Keeping part of the start: start_weight, chosen on dev", render_start_weight),
    "claims.json": ("Claims", render_claims),
}
EXPECTED = ("querygen.json", "cross_encoder.json", "speed_cpu.json", "speed_gpu.json")  # said when missing
