"""``easyroutine-dist demo``: the main job end to end on a local Ray cluster with the embedded SmolLM2."""

from __future__ import annotations

from pathlib import Path

import typer

from .app import command, console
from .lens import load_tokenizer, show_lens
from .runs import print_table, runs_table

DEMO_PROMPTS = [
    "The capital of France is", "The capital of Germany is", "The capital of Italy is", "The capital of Spain is",
    "The capital of Japan is", "The largest planet in the solar system is", "Water is made of hydrogen and",
    "The opposite of hot is", "One, two, three, four,", "The sun rises in the", "Monday, Tuesday,",
    "The chemical symbol for gold is", "A baby cat is called a", "Paris is a city in", "The color of the sky is",
    "Shakespeare wrote Romeo and",
]


@command()
def demo(
    base_dir: str = typer.Option("./runs", help="Where the run is saved: a local folder or fsspec URL."),
    num_workers: int = typer.Option(2, help="Ray worker actors, each holding the model."),
    model: str = typer.Option("smollm2", help="Model to run (the embedded SmolLM2-135M-Instruct by default)."),
    plot: Path = typer.Option(Path("runs/logit_lens.png"), help="Where to write the lens heatmap PNG."),
) -> None:
    """The main job end to end: local Ray cluster, workers, shards in BASE_DIR, lens on the workers, a query."""
    from ..config import ExtractionConfig
    from ..distributed import DistributedExtractor
    from ..interpretability.activation_saver import ActivationLoader, ActivationSaver

    console.rule("easyroutine_dist demo")
    console.print(f"{len(DEMO_PROMPTS)} prompts, model {model}, {num_workers} Ray workers, storage {base_dir}")
    saver = ActivationSaver(base_dir, "demo")
    extractor = DistributedExtractor(model, num_workers=num_workers)
    config = ExtractionConfig(extract_resid_out=True, save_logits=False, save_input_ids=True)
    try:
        handle = extractor.extract(DEMO_PROMPTS, ["all"], config, saver, batch_size=4, partition_size=4,
                                   tag="demo", logit_lens={"target_key": "resid_out_{i}", "top_k": 5})
    finally:
        extractor.shutdown()
    console.print(f"run [bold]{handle.run_id}[/bold] committed at {handle.url}", soft_wrap=True)
    result = ActivationLoader.from_saver(saver).query(tag="demo")
    print_table(runs_table(result))
    cache, _ = result.load(handle.run_id)
    rows = show_lens(cache, 0, plot, load_tokenizer(model))
    console.print(f"{DEMO_PROMPTS[0]!r} -> {rows[-1][1]!r} at the last layer (p={rows[-1][2]:.2f})")
