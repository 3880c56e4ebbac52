"""``easyroutine-dist extract``: a distributed extraction, or with ``--dry-run`` its plan (no Ray, no workers)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from .app import command, console, err_console
from .jobs import prepare
from .output import LOG_CHOICES, json_logs, resume_command, setup_logging


@command()
def extract(
    model: Optional[str] = typer.Option(
        None, help="HF hub id, local folder, 'module:function' factory, or 'smollm2' (the embedded "
                   "SmolLM2-135M-Instruct). Default: the job's model, else smollm2."),
    dataset: Optional[str] = typer.Option(
        None, help=".txt file (one prompt per line), .json/.jsonl file, save_to_disk folder or HF dataset name. "
                   "Default: the job's dataset (required)."),
    base_dir: Optional[str] = typer.Option(
        None, help="Local folder or fsspec URL (s3://bucket/prefix). Default: the job's, else ./runs."),
    experiment: Optional[str] = typer.Option(None, help="Experiment name. Default: the job's, else 'default'."),
    num_workers: Optional[int] = typer.Option(None, help="Ray worker actors. Default: the job's, else 1."),
    gpus_per_worker: Optional[int] = typer.Option(None, help="GPUs per worker. Default: the job's, else 0 (CPU)."),
    cpus_per_worker: Optional[float] = typer.Option(None, help="CPUs Ray reserves per worker. Default: the job's, "
                                                                "else 1."),
    batch_size: Optional[int] = typer.Option(None, help="Prompts per forward. Default: the job's, else 8."),
    partition_size: Optional[int] = typer.Option(
        None, help="Prompts per partition (one part of the run). Default: the job's, else 64."),
    positions: Optional[list[str]] = typer.Option(
        None, "--positions", help="Repeatable: last, first, all, last-2, 3, -1, 2:5 (a range). Default: the "
                                  "job's, else last."),
    extract_: Optional[list[str]] = typer.Option(
        None, "--extract", help="Repeatable: resid_out, resid_in, attn_out, mlp_out, head_out, ... Default: the "
                                "job's extraction_config, else resid_out."),
    logit_lens: Optional[str] = typer.Option(
        None, help="Run the lens on the workers, e.g. 'resid_out_{i}'. Default: the job's, else none."),
    top_k: int = typer.Option(5, help="Tokens the lens keeps per layer and position."),
    tag: Optional[str] = typer.Option(None, help="A tag stored with the run. Default: the job's, else none."),
    run_id: Optional[str] = typer.Option(None, help="Resume this run (with --resume). Default: a new run."),
    resume: bool = typer.Option(False, help="Recompute only the partitions of --run-id without a commit record."),
    ray_address: Optional[str] = typer.Option(
        None, help="'auto' to join a running cluster. Default: the job's, else a local cluster."),
    max_inflight_bytes: Optional[int] = typer.Option(
        None, help="Per worker, the most bytes of finished batches waiting for storage; a faster forward then waits. "
                   "Default: the job's, else 536870912 (512 MiB)."),
    shared_base_dir: bool = typer.Option(
        False, help="The local base_dir is one filesystem every node mounts (NFS...); without it a local base_dir "
                    "on a cluster of several nodes is refused. Default: the job's, else off."),
    config: Optional[Path] = typer.Option(
        None, help="Job YAML (see cluster/job-*.yaml); flags override it. Default: none."),
    dry_run: bool = typer.Option(
        False, help="Print the plan (rows, partitions, keys, bytes, shards, requests, memory, time) from a local "
                    "calibration; start no cluster, write nothing."),
    as_json: bool = typer.Option(False, "--json",
                                 help="With --dry-run: print the plan as one JSON object. Default: off (a table)."),
    log_format: str = typer.Option(
        "auto", help="Run events and log lines: 'plain' (one unwrapped line each, on stderr), 'json' (one JSON "
                     "object per event on stdout, nothing else there) or 'auto' (rich on a terminal, else plain)."),
) -> None:
    """Distributed extraction into BASE_DIR; prints the run id and where it was saved. Everything that can be
    checked (dataset, names, keys, model, storage, positions on the first rows) is checked before Ray starts."""
    setup_logging(log_format)
    flags = {"model": model, "dataset": dataset, "base_dir": base_dir, "experiment": experiment,
             "num_workers": num_workers, "gpus_per_worker": gpus_per_worker, "cpus_per_worker": cpus_per_worker,
             "batch_size": batch_size,
             "partition_size": partition_size, "target_token_positions": positions, "extract": extract_,
             "logit_lens": logit_lens, "top_k": top_k, "tag": tag, "run_id": run_id, "resume": resume,
             "ray_address": ray_address, "shared_base_dir": shared_base_dir or None,
             "max_inflight_bytes": max_inflight_bytes}
    job = prepare(flags, config)
    if dry_run:
        _print_plan(job, as_json)
        return
    if as_json:
        err_console().print("note: --json only applies to --dry-run", markup=False)
    from ..distributed import DistributedExtractor

    extractor = DistributedExtractor(job.model, num_workers=job.num_workers, num_gpus_per_worker=job.gpus_per_worker,
                                     num_cpus_per_worker=job.cpus_per_worker, model_kwargs=job.model_kwargs,
                                     ray_address=job.ray_address, shared_base_dir=job.shared_base_dir,
                                     max_inflight_bytes=job.max_inflight_bytes)
    extractor.resume_command = resume_command  # logged with the run id before the workers load the model
    try:
        handle = extractor.extract(job.dataset, job.positions, job.config, job.saver, batch_size=job.batch_size,
                                   partition_size=job.partition_size, tag=job.tag, logit_lens=job.lens,
                                   run_id=run_id, resume=resume)
    finally:
        extractor.shutdown()
    if not json_logs():  # with --log-format json, stdout holds the events only (run_committed names the run)
        console.print(f"run [bold]{handle.run_id}[/bold] saved at {handle.url}", soft_wrap=True)


def _print_plan(job: Any, as_json: bool) -> None:
    from ..distributed.plan import plan_extraction

    plan = plan_extraction(job.source, job.dataset, job.positions, job.config, job.saver,
                           num_workers=job.num_workers, num_gpus_per_worker=job.gpus_per_worker,
                           batch_size=job.batch_size, partition_size=job.partition_size, logit_lens=job.lens,
                           tag=job.tag, max_inflight_bytes=job.max_inflight_bytes)
    if as_json:  # stdout: the one JSON object; stderr: the calibration's progress bars, then one line
        err_console().print("dry run: nothing was started or written", markup=False)
        typer.echo(json.dumps(plan.to_dict()))
        return
    console.rule("dry run: nothing was started or written")
    for line in plan.summary():
        console.print(line, markup=False, highlight=False, soft_wrap=True)
