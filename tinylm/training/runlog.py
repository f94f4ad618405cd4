"""What a training run reports besides metrics.jsonl: Weights & Biases, which never stops a run, and the loss curve
(training and validation loss against tokens seen) drawn into out_dir/loss.png when the run stops.
"""

import dataclasses
import json
import os

from tinylm.storage import atomic_write


def start_wandb(args, config: dict, out_dir: str, run_id: str | None):
    """A wandb run, or None. WANDB_MODE=offline/disabled is honored; with no API key it logs offline; any other
    wandb failure is a warning, never the end of the training run."""
    try:
        import wandb
    except ImportError:
        raise SystemExit("error: --use_wandb needs the wandb package: pip install wandb") from None
    kwargs = dict(project=args.wandb_project, name=args.wandb_run_name, dir=out_dir, id=run_id, resume="allow",
                  config={k: dataclasses.asdict(v) for k, v in config.items()})
    try:
        try:  # WANDB_MODE is passed on explicitly: wandb reads the environment only once per process
            return wandb.init(mode=os.environ.get("WANDB_MODE") or None, **kwargs)
        except wandb.errors.UsageError as e:  # no API key and WANDB_MODE unset: nothing needs an account offline
            print(f"wandb: {e}; logging offline under {out_dir}/wandb (upload later with `wandb sync`)")
            return wandb.init(mode="offline", **kwargs)
    except Exception as e:
        print(f"warning: wandb could not start ({type(e).__name__}: {e}); training continues without it")
        return None


def plot_losses(metrics_path: str, png_path: str):
    """Training and validation loss against tokens seen, from metrics.jsonl."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(metrics_path)]
    train = [(r["tokens"], r["loss"]) for r in rows if "loss" in r and "tokens" in r]
    val = [(r["tokens"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), lw=0.8, alpha=0.6, label="train")
    if val:
        ax.plot(*zip(*val), marker="o", ms=3, label="validation")
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(png_path, lambda path: fig.savefig(path, format="png", dpi=120))
    plt.close(fig)
