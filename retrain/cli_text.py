"""The command line's text output for people (``--json`` prints the results' dictionaries instead)."""

from __future__ import annotations

from pathlib import Path

import click


def tflite_table(figures: dict) -> None:
    if not figures:
        return
    click.echo(f"{'tflite':<8} {'file':<22} {'size MB':>8} {'accuracy':>9} {'95% CI':>13} {'images':>6} "
               f"{'agreement':>10} {'ms/image':>9}")
    for name, row in figures.items():
        low, high = row["accuracy_interval"]
        click.echo(f"{name:<8} {row['file']:<22} {row['size_bytes'] / 1e6:8.2f} {row['accuracy']:9.4f} "
                   f"{low:6.3f}-{high:.3f} {row['n_images']:6d} {row['agreement']:10.4f} {row['ms_per_image']:9.2f}")


def accuracy(figures: dict) -> str:
    from .evaluation.evaluate import accuracy_text

    return accuracy_text(figures["accuracy"], figures["n_images"], figures["accuracy_interval"])


def head_line(head: dict) -> None:
    line = f"head: {head['solver']}"
    cv = head.get("cross_validation")
    if cv:
        line += f", L2 strength C={cv['c']:g} " + (f"chosen by {cv['folds']}-fold cross-validation" if cv["folds"] else "(fixed)")
    elif head.get("epochs_run") is not None:
        line += f", {head['epochs_run']} epoch(s), best {head['best_epoch']}"
    if head.get("validation_folded"):
        line += f"; {head['validation_folded']} validation image(s) folded into training"
    click.echo(line + f" ({head['seconds']:.1f} s)")


def label_errors_line(errors: list, page: str | None) -> None:
    if not errors:
        return
    shown = "; ".join(f"{Path(e['path']).name} in {e['class']} looks like {e['looks_like']} ({e['confidence']:.2f})"
                      for e in errors[:3])
    more = f" and {len(errors) - 3} more" if len(errors) > 3 else ""
    click.echo(f"likely label errors: {len(errors)} ({shown}{more}); see {page}")


def balance_line(balance: dict) -> None:
    counts = balance["class_counts"]
    largest, smallest = max(counts, key=counts.get), min(counts, key=counts.get)
    if counts[smallest] == counts[largest]:
        line = f"class balance: {counts[largest]} training images in every class; class weights: {balance['class_weight']}"
    else:
        line = (f"class balance: {counts[smallest]}-{counts[largest]} training images per class, imbalance "
                f"{balance['imbalance_ratio']:.2f} ({largest} / {smallest}); class weights: {balance['class_weight']}")
    if balance["class_weight"] == "none" and balance["imbalance_ratio"] >= 2:
        line += " (try --class-weight balanced)"
    click.echo(line)


def fine_tune_line(fine: dict, seconds: float) -> None:
    frozen, best = fine["frozen_validation"], fine["best_validation"]
    head = f"fine-tune: {fine['epochs_run']} epoch(s), learning rate {fine['learning_rate']:g}, {seconds:.1f} s: "
    if fine["weights_changed"]:
        click.echo(head + f"validation accuracy {frozen['accuracy']:.4f} -> {best['accuracy']:.4f}, loss "
                   f"{frozen['loss']:.4f} -> {best['loss']:.4f} (epoch {fine['best_epoch']}); module weights changed "
                   f"(weights fingerprint {fine['weights_fingerprint'][:16]})")
    else:
        click.echo(head + f"no epoch beat the frozen module (validation accuracy {frozen['accuracy']:.4f}, "
                   f"loss {frozen['loss']:.4f}): its weights were kept")


def skipped_note(skipped: list, total: int, where: str = "") -> None:
    """The files a command skipped, the first ten with their reasons, on stderr."""
    if skipped:
        click.echo(f"note: {total} file(s) skipped{where}:", err=True)
        for item in skipped[:10]:
            click.echo(f"  {item['path']}: {item['reason']}", err=True)
