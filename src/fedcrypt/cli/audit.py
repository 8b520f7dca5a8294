"""``fedcrypt audit``: attack a job the way its server could, and write what the attacks got."""

from __future__ import annotations

import json
import logging
import time
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedcrypt.audit.inversion import ATTACKS
from fedcrypt.audit.leakage import RATIOS, RULES, InversionReport, SweepPoint, audit_inversion, selection_sweep
from fedcrypt.audit.metrics import NOISE_PSNR, WORKS_PSNR
from fedcrypt.audit.membership import MembershipReport, audit_membership
from fedcrypt.cli.errors import err_console, user_errors
from fedcrypt.config.job import JobConfig, JobError, load_job
from fedcrypt.data import DatasetError, load_dataset

console = Console()
_user_errors = partial(user_errors, JobError, DatasetError)

REPORT = "audit.json"


def _numbers(text: str, kind: type, what: str) -> list[Any]:
    try:
        return [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{what} must be a comma-separated list, got {text!r}") from None


def audit(
    job_file: Annotated[Path, typer.Argument(help="TOML job file.", show_default=False)],
    attack: Annotated[str, typer.Option(help=f"{' | '.join((*ATTACKS, 'mia'))} (default: idlg at batch 1, cosine above).")] = "",
    out: Annotated[Path | None, typer.Option(help="Output folder (default: audits/<job>-<time>).")] = None,
    clients: Annotated[int, typer.Option(min=1, max=256, help="Gradient attacks: updates attacked (one client each).")] = 8,
    batch: Annotated[int, typer.Option(min=1, max=64, help="Gradient attacks: examples per attacked update.")] = 1,
    sweep: Annotated[bool, typer.Option(help="Gradient attacks: also sweep selective-encryption masks.")] = False,
    ratios: Annotated[str, typer.Option(help="--sweep: encrypt ratios.")] = ",".join(f"{r:g}" for r in RATIOS),
    rules: Annotated[str, typer.Option(help="--sweep: selection rules.")] = ",".join(RULES),
    iterations: Annotated[int | None, typer.Option(min=1, help="Optimizer steps per attack (default 300; cosine 2000).")] = None,
    restarts: Annotated[int, typer.Option(min=1, max=64, help="Seeded starts per attack; the best match is kept.")] = 1,
    members: Annotated[int, typer.Option(min=10, help="mia: members (and as many non-members) attacked.")] = 1000,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the attacked batches and the attacks' starts.")] = 0,
    device: Annotated[str, typer.Option(help="Torch device for the attacks (cpu, cuda).")] = "cpu",
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="Dataset folder (default: $FEDCRYPT_DATA).")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log each step.")] = False,
) -> None:
    """Measure what the job's mechanism protects: gradient inversion (DLG, iDLG, cosine + TV)
    on exactly what its server reads of one round's updates, or membership inference on its
    final model. Writes audit.json and pictures to --out and summarizes them here."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    with _user_errors():
        attack = attack or ("idlg" if batch == 1 else "cosine")
        if attack not in (*ATTACKS, "mia"):
            raise ValueError(f"unknown attack {attack!r}; choose one of: {', '.join((*ATTACKS, 'mia'))}")
        if sweep and attack == "mia":
            raise ValueError("--sweep applies to the gradient attacks, not to mia")
        sweep_ratios = _numbers(ratios, float, "--ratios")
        if not sweep_ratios or not all(0 <= r <= 1 for r in sweep_ratios):
            raise ValueError(f"--ratios must be numbers in [0, 1], got {ratios!r}")
        sweep_rules = _numbers(rules, str, "--rules")
        if unknown := [r for r in sweep_rules if r not in RULES]:
            raise ValueError(f"unknown selection rule {unknown[0]!r}; choose from: {', '.join(RULES)}")
        if device != "cpu" and not device.startswith("cuda"):
            raise ValueError(f"--device must be cpu or cuda[:N], got {device!r}")
        if device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ValueError("--device cuda: this machine's PyTorch sees no CUDA GPU")
        job = load_job(job_file)
        out_dir = out or Path("audits") / f"{job.job.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        if (out_dir / REPORT).exists():
            raise ValueError(f"{out_dir} already holds an audit ({REPORT}); choose another --out")
        dataset = load_dataset(job.data.dataset, data_dir or job.data.data_dir)
        if attack != "mia" and len(dataset.input_shape) != 3:
            raise ValueError(f"gradient-inversion attacks rebuild images; {dataset.name} inputs have shape "
                             f"{dataset.input_shape}")
        out_dir.mkdir(parents=True, exist_ok=True)
        report: dict[str, Any] = {"job": job.job.name, "mechanism": _describe(job), "attack": attack}
        started = time.perf_counter()
        if attack == "mia":
            membership = audit_membership(job, data_dir=data_dir, members=members, progress=_say)
            report["membership"] = membership.to_json()
            _show_membership(membership)
        else:
            _say(f"auditing [bold]{escape(job.job.name)}[/] ({escape(_describe(job))}) with {attack}: "
                 f"{clients} update{'s' * (clients != 1)} of batch {batch}, model {job.model.name} on {dataset.name}")
            attacked, _ = audit_inversion(job, dataset, attack=attack, clients=clients, batch_size=batch, seed=seed,
                                          iterations=iterations, restarts=restarts, device=device, progress=_say)
            result = attacked.report
            report["inversion"] = result.to_json()
            from fedcrypt.audit.figures import image_grid, ratio_plot  # matplotlib: only when drawing

            grid = out_dir / "reconstructions.png"
            image_grid(attacked.originals, attacked.reconstructions, result.images, grid,
                       f"{job.job.name}: {attack} on {_describe(job)}, batch {batch}")
            _show_inversion(result)
            if sweep:
                points = selection_sweep(job, dataset, attack=attack, rules=sweep_rules, ratios=sweep_ratios,
                                         clients=clients, batch_size=batch, seed=seed, iterations=iterations,
                                         device=device, progress=_say)
                report["sweep"] = [vars(p) for p in points]
                ratio_plot(points, out_dir / "psnr_vs_ratio.png",
                           f"{job.job.name}: {attack}, {job.model.name} on {dataset.name}, batch {batch}")
                _show_sweep(points)
        report["seconds"] = time.perf_counter() - started
        (out_dir / REPORT).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    written = sorted(p.name for p in out_dir.iterdir() if p.suffix in (".json", ".png"))
    console.print(f"[bold green]done[/] in {report['seconds']:.1f} s; wrote {out_dir}/{{{', '.join(written)}}}",
                  highlight=False)


def _say(message: str) -> None:
    err_console.print(message, highlight=False)


def _describe(job: JobConfig) -> str:
    privacy = job.privacy
    text = privacy.mechanism
    if privacy.mechanism == "ckks" and privacy.encrypt_layers:
        text += f" (encrypt_layers {', '.join(privacy.encrypt_layers)})"
    elif privacy.mechanism == "ckks" and privacy.encrypt_ratio < 1:
        text += f" (encrypt_ratio {privacy.encrypt_ratio:g})"
    if job.dp is not None:
        settings = job.dp_settings()
        assert settings is not None
        text += f" + DP ({job.dp.noise} noise, z={settings.noise_multiplier:.3g}, C={job.dp.clip_norm:g})"
    return text


def _show_inversion(result: InversionReport) -> None:
    table = Table(title=f"{result.attack} on {result.mechanism}: {len(result.images)} images")
    for column in ("client", "label", "recovered", "MSE", "PSNR (dB)", "SSIM"):
        table.add_column(column, justify="right")
    for image in result.images:
        table.add_row(image.client, str(image.label), str(image.recovered_label), f"{image.mse:.2e}",
                      f"{image.psnr:.1f}", f"{image.ssim:.3f}")
    console.print(table)
    console.print(
        f"server read {result.readable:.1%} of each update; mean PSNR [bold]{result.mean_psnr:.1f} dB[/], "
        f"SSIM {result.mean_ssim:.3f}, labels recovered {result.label_rate:.0%}",
        highlight=False,
    )
    if result.readable == 0:
        verdict = "the server reads no value of the updates: the attack can only guess"
    elif result.mean_psnr >= WORKS_PSNR:
        verdict = f"[bold red]the server can rebuild the training inputs[/] (mean PSNR >= {WORKS_PSNR:g} dB)"
    elif result.mean_psnr <= NOISE_PSNR:
        verdict = f"[bold green]reconstructions are noise[/] (mean PSNR <= {NOISE_PSNR:g} dB)"
    else:
        verdict = "[bold yellow]partial leakage[/]: look at reconstructions.png"
    console.print(f"verdict: {verdict}", highlight=False)


def _show_sweep(points: list[SweepPoint]) -> None:
    ratios = sorted({p.ratio for p in points})
    table = Table(title="mean PSNR (dB) with the selected share encrypted")
    table.add_column("rule")
    for ratio in ratios:
        table.add_column(f"{ratio:.0%}" if ratio * 100 == int(ratio * 100) else f"{ratio:.1%}", justify="right")
    for rule in dict.fromkeys(p.rule for p in points):
        row = {p.ratio: p for p in points if p.rule == rule}
        table.add_row(rule, *(_psnr_cell(row[r].mean_psnr) for r in ratios))
    console.print(table)
    for rule in dict.fromkeys(p.rule for p in points):
        safe = [p.ratio for p in points if p.rule == rule and p.mean_psnr <= NOISE_PSNR]
        console.print(f"{rule}: " + (f"noise level from encrypt_ratio {min(safe):g}" if safe else
                                     f"never at noise level (<= {NOISE_PSNR:g} dB) below 100%"), highlight=False)


def _psnr_cell(psnr: float) -> str:
    colour = "red" if psnr >= WORKS_PSNR else "green" if psnr <= NOISE_PSNR else "yellow"
    return f"[{colour}]{psnr:.1f}[/]"


def _show_membership(report: MembershipReport) -> None:
    table = Table(title=f"membership inference on {report.job}'s final model ({report.model} on {report.dataset})")
    for column in ("model", "ε", "rounds", "test acc", "member acc", "loss AUC", "loss adv.", "shadow AUC",
                   "shadow adv.", "s"):
        table.add_column(column, justify="right")
    for row in report.rows:
        table.add_row(
            row.label, "-" if row.epsilon is None else f"{row.epsilon:.3g}", str(row.rounds),
            f"{row.test_accuracy:.3f}", f"{row.train_accuracy:.3f}", f"{row.loss_auc:.3f}",
            f"{row.loss_advantage:.3f}", f"{row.shadow_auc:.3f}", f"{row.shadow_advantage:.3f}", f"{row.seconds:.0f}",
        )
    console.print(table)
    splits = ", ".join(f"{k} {v}" for k, v in report.splits.items())
    console.print(f"splits: {splits}; an attack that learns nothing scores AUC 0.5 ± {report.auc_stderr:.3f} "
                  "(one standard error)", highlight=False)
    for row in report.rows:
        if row.stopped:
            console.print(f"{row.label}: {escape(row.stopped)}", highlight=False)
    if report.note:
        console.print(f"note: {escape(report.note)}", highlight=False)
