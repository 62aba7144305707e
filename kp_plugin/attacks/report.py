"""Write an :class:`~kp_plugin.attacks.suite.AttackReport` to a directory:
``report.json`` (every figure), ``report.md`` (tables) and PNG plots
(accuracy against the attacker's data fraction, protected vs. public base;
fraction of the key each attack recovered; the partial-key curve; the
random-search histogram). Nothing written holds key material: results
carry fractions and accuracies, the key only by its public fingerprint.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Optional, Union

from ..checkpoint import write_together
from .suite import KEY_ABOVE_CHANCE_POINTS, AttackReport

__all__ = ["write_attack_report", "report_markdown", "report_files", "REPORT_JSON", "REPORT_MD", "FIGURES"]

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
FIGURES = {
    "finetune": "finetune.png",
    "recovery": "key_recovery.png",
    "partial_key": "partial_key.png",
    "random_search": "random_search.png",
}


def _figure_names(report: AttackReport) -> list:
    """The entries of :data:`FIGURES` that ``report`` has a plot for."""
    r = report.results
    recovery = any(name in r for name in ("heuristic_search", "key_estimation", "weight_matching"))
    present = {"finetune": "finetune" in r, "recovery": recovery, "partial_key": "partial_key" in r,
               "random_search": "random_search" in r}
    return [name for name in FIGURES if present[name]]


def report_files(report: AttackReport, *, figures: bool = True) -> list:
    """The file names :func:`write_attack_report` writes for ``report``."""
    return [REPORT_JSON, REPORT_MD] + ([FIGURES[name] for name in _figure_names(report)] if figures else [])


def _pct(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _table(header: list, rows: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def report_markdown(report: AttackReport, *, figures: Optional[dict] = None) -> str:
    """The report as Markdown (tables of every attack, targets first)."""
    figures = figures or {}
    meta, r = report.meta, report.results
    out = ["# Attack report", ""]
    # "base": what the attacks that start from a public model started from
    # (a random initialization reads very differently from pre-trained weights).
    facts = [(k, meta[k]) for k in ("model", "dataset", "base", "scheme", "block_size", "fingerprint", "budget",
                                    "seed", "test_images", "train_images", "machine") if meta.get(k) is not None]
    out += [_table(["", ""], facts), ""]

    targets = report.targets()
    if targets:
        out += ["## Targets", "", _table(
            ["target", "measured", "limit", "met"],
            [[t.name, f"{t.measured:+.1f} {t.unit}", f"<= {t.limit:g} {t.unit}",
              "n/a" if t.met is None else "yes" if t.met else f"**no** (by {-t.margin:.1f})"] for t in targets]), ""]
        no_verdict = report.key_near_chance()
        if no_verdict:
            out += [f"Not applicable (n/a): {no_verdict}. A verdict needs the owner's key to score more than "
                    f"{KEY_ABOVE_CHANCE_POINTS:g} points above chance; nearer, the key itself would pass as a wrong "
                    "key, and a limit that holds shows only that the model does not work on this data or image "
                    "size (check --data and --image-size). A missed target is still a finding.", ""]

    if "wrong_keys" in r:
        w = r["wrong_keys"]
        out += ["## Wrong keys", "", _table(["", "accuracy"], [
            ["with the key", _pct(w.key_accuracy)],
            [f"{len(w.accuracies)} wrong keys: mean +- std", f"{_pct(w.mean)} +- {_pct(w.std)}"],
            ["worst wrong key (max)", _pct(w.max)],
            ["least-likely readout under wrong keys: mean / max",
             f"{_pct(w.least_likely_mean)} / {_pct(w.least_likely_max)}"],
            ["plain images (no key)", _pct(w.plain_accuracy)],
            ["plain images, least-likely readout", _pct(w.plain_least_likely_accuracy)],
            ["chance (majority class)", _pct(w.chance)],
        ]), ""]
    if "random_search" in r:
        s = r["random_search"]
        out += ["## Random key search", "", _table(["", ""], [
            ["keys tried", s.num_keys],
            ["images per key (search batch)", s.search_images],
            ["best key on the search batch (selection-biased)", _pct(s.best_search_accuracy)],
            [f"that key on {s.holdout_images} held-out images", _pct(s.best_holdout_accuracy)],
            ["the true key on the held-out images", _pct(s.key_accuracy)],
            ["chance (held-out)", _pct(s.chance)],
            ["keys per second", f"{s.num_keys / s.seconds:.0f}" if s.seconds else "n/a"],
        ]), ""]
        if "random_search" in figures:
            out += [f"![random search]({figures['random_search']})", ""]
    if "heuristic_search" in r:
        h = r["heuristic_search"]
        out += ["## Swap search (hill climbing)", "", _table(["", ""], [
            ["proposals scored", h.budget],
            ["batch accuracy: start -> end", f"{_pct(h.initial_search_accuracy)} -> {_pct(h.final_search_accuracy)}"],
            ["final key on held-out images", _pct(h.final_holdout_accuracy)],
            ["key positions right: start -> end",
             f"{_pct(h.initial_recovered_fraction)} -> {_pct(h.recovered_fraction)}"],
        ]), ""]
    if "partial_key" in r:
        p = r["partial_key"]
        out += ["## Partial key", "", f"With the key: {_pct(p.key_accuracy)}; chance {_pct(p.chance)}.", "",
                _table(["fraction of the key right", "accuracy"],
                       [[f"{f:.2f}", _pct(a)] for f, a in zip(p.fractions, p.accuracies)]), ""]
        if "partial_key" in figures:
            out += [f"![partial key]({figures['partial_key']})", ""]
    if "weight_matching" in r:
        m = r["weight_matching"]
        out += ["## Weight matching (first layer vs. the public base)", "", _table(["", ""], [
            ["layer", f"`{m.layer}` ({m.layer_kind})"],
            ["key positions recovered", f"{_pct(m.recovered_fraction)} (chance {_pct(m.chance_fraction)})"],
            ["negative/positive bits right", _pct(m.flip_agreement)],
            ["block-scramble entries recovered", _pct(m.block_recovered_fraction)],
            ["mean |cosine| of matched columns", f"{m.mean_similarity:.3f}"],
            ["accuracy with the recovered key", _pct(m.accuracy)],
            ["accuracy with the true key", _pct(m.key_accuracy)],
        ]), ""]
    if "key_estimation" in r:
        e = r["key_estimation"]
        out += ["## Learned key estimation (Gumbel-Sinkhorn)", "", _table(["", ""], [
            ["attacker's labelled images / steps", f"{e.train_images} / {e.steps}"],
            ["key positions recovered", f"{_pct(e.recovered_fraction)} (chance {_pct(e.chance_fraction)})"],
            ["negative/positive bits right", _pct(e.flip_agreement)],
            ["accuracy with the estimated key", _pct(e.accuracy)],
            ["accuracy with the true key", _pct(e.key_accuracy)],
        ]), ""]
    if "finetune" in r:
        f = r["finetune"]
        out += ["## Fine-tuning attack", "",
                f"Stolen weights on plain images before fine-tuning: {_pct(f.plain_accuracy)}; "
                f"the owner's model with the key: {_pct(f.key_accuracy)}.", "",
                f"Each fraction: {f.repeats} draw(s) of the attacker's subset and training seed; accuracies are "
                "means, the last column gives each draw's gain.", "",
                _table(["attacker data", "images", "steps", "stolen weights", "public base", "gain",
                        "gain per draw"],
                       [[f"{row.fraction:.0%}", row.images, row.steps, _pct(row.protected_accuracy),
                         _pct(row.base_accuracy), f"{100 * row.advantage:+.1f} pts",
                         ", ".join(f"{100 * a:+.1f}" for a in row.advantages)] for row in f.rows]), ""]
        if "finetune" in figures:
            out += [f"![fine-tuning attack]({figures['finetune']})", ""]
    if "recovery" in figures:
        out += ["## Key recovered by each attack", "", f"![key recovered]({figures['recovery']})", ""]
    if report.skipped:
        out += ["## Not run", "", *[f"- {name}: {why}" for name, why in report.skipped.items()], ""]
    if report.seconds:
        out += ["Seconds per attack: " + ", ".join(f"{n} {s:.0f}" for n, s in report.seconds.items()), ""]
    return "\n".join(out)


def _figures(report: AttackReport) -> dict:
    """The report's plots, drawn but not saved: ``{FIGURES key: figure}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = {}
    r = report.results
    names = _figure_names(report)
    if "finetune" in names:
        f = r["finetune"]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        xs = [100 * row.fraction for row in f.rows]
        ax.plot(xs, [100 * row.protected_accuracy for row in f.rows], "o-", label="stolen protected weights")
        base = str(report.meta.get("base") or "")
        ax.plot(xs, [100 * row.base_accuracy for row in f.rows], "s--",
                label="randomly initialized base" if "random" in base else "public pre-trained base")
        ax.axhline(100 * f.key_accuracy, color="grey", lw=0.8, ls=":", label="owner, with the key")
        ax.set_xscale("log")
        ax.set_xlabel("attacker's labelled data (% of the training set)")
        ax.set_ylabel("test accuracy (%)")
        ax.legend(fontsize=8)
        ax.set_title("Fine-tuning attack")
        fig.tight_layout()
        drawn["finetune"] = fig
    if "recovery" in names:
        bars = [(label, r[name].recovered_fraction) for name, label in
                (("heuristic_search", "swap search"), ("key_estimation", "key estimation"),
                 ("weight_matching", "weight matching")) if name in r]
        chance = next(getattr(r[n], "chance_fraction", None) for n in ("weight_matching", "key_estimation",
                                                                      "heuristic_search") if n in r)
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.bar([b[0] for b in bars], [100 * b[1] for b in bars], color="tab:red")
        if chance:
            ax.axhline(100 * chance, color="grey", ls=":", label="random guess")
            ax.legend(fontsize=8)
        ax.set_ylabel("key positions recovered (%)")
        ax.set_ylim(0, 100)
        ax.set_title("Fraction of the key recovered")
        fig.tight_layout()
        drawn["recovery"] = fig
    if "partial_key" in names:
        p = r["partial_key"]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([100 * f for f in p.fractions], [100 * a for a in p.accuracies], "o-")
        ax.axhline(100 * p.chance, color="grey", ls=":", label="chance")
        ax.set_xlabel("fraction of the key right (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title("Partial key")
        ax.legend(fontsize=8)
        fig.tight_layout()
        drawn["partial_key"] = fig
    if "random_search" in names:
        s = r["random_search"]
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.hist([100 * a for a in s.search_accuracies], bins=30, color="tab:blue")
        ax.axvline(100 * s.chance, color="grey", ls=":", label="chance")
        ax.axvline(100 * s.best_holdout_accuracy, color="tab:red", label="best key, held out")
        ax.set_xlabel(f"accuracy on the {s.search_images}-image search batch (%)")
        ax.set_ylabel("keys")
        ax.set_title(f"{s.num_keys} random keys")
        ax.legend(fontsize=8)
        fig.tight_layout()
        drawn["random_search"] = fig
    return drawn


def _save_figure(figure, path: Path) -> None:
    figure.savefig(path, format="png", dpi=120)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _remove_stale_figure(path: Path) -> None:
    """Remove ``path`` if it is a link or a PNG (an earlier report's plot,
    which report.md would no longer describe); anything else stays."""
    try:
        if not path.is_symlink():
            if not path.is_file():
                return
            with open(path, "rb") as fh:
                if fh.read(len(_PNG_SIGNATURE)) != _PNG_SIGNATURE:
                    return
        path.unlink()
    except FileNotFoundError:
        pass


def write_attack_report(report: AttackReport, directory: Union[str, os.PathLike], *, figures: bool = True) -> Path:
    """Write ``report.json``, ``report.md`` and (``figures=True``) the PNG
    plots into ``directory``; returns the directory. A plot of an earlier
    report there that this one does not have (a :data:`FIGURES` name, PNG
    content) is removed; no other file is touched.

    Example:
        >>> write_attack_report(run_attacks(protected, test_set), "out/attack")   # doctest: +SKIP
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    drawn = _figures(report) if figures else {}
    try:
        written = {name: FIGURES[name] for name in drawn}
        # Both texts before any file is written, then every file as one
        # change (staged beside its place, renamed in together), so
        # report.json, report.md and the plots never come from two runs.
        texts = [(REPORT_JSON, json.dumps(report.summary(), indent=2, sort_keys=True) + "\n"),
                 (REPORT_MD, report_markdown(report, figures=written))]
        writes = [(directory / FIGURES[name], functools.partial(_save_figure, fig)) for name, fig in drawn.items()]
        writes += [(directory / name, functools.partial(Path.write_text, data=text)) for name, text in texts]
        write_together(writes)
    finally:
        if drawn:
            import matplotlib.pyplot as plt

            for fig in drawn.values():
                plt.close(fig)
    for name in set(FIGURES.values()) - set(written.values()):
        _remove_stale_figure(directory / name)
    return directory
