"""The demo's trained models on EHR text written in other words: does their reading of the text carry over?

The demo's cohort writes every EHR with ``describe_ehr``; a user, or anyone checking the model, writes their own.
This writes the held-out subjects' EHR fields in phrasings made for this benchmark alone, never used in training (a
terse note, a key-value list, narrative sentences) and in four written from the field list alone by someone who had
not seen what the stage notes recognise (a clinic letter, a registry export, a progress note, a visit summary). It
evaluates the demo's text-only and image + text models on them (checkpoints of a finished ``make demo``, calibrated
on its validation split, as the demo does) with the ``medblip_text`` processor's ``score_stages`` on (the default:
each MMSE / CDR value gets the stage words the builders write) and off. The EHR regression reads the fields, not
the text, so its row is the same for every phrasing. The held-out sets are the demo's and, when
``benchmarks/demo_on_fresh_subjects.py`` has simulated them, the fresh subjects' (pooled: 375 per set with its
defaults).

    python benchmarks/ehr_phrasings.py [--root .cache/demo] [--phrasings own independent]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lavis_medblip.annotations.ehr import sex_of  # noqa: E402
from lavis_medblip.annotations.schema import read_annotations, write_annotations  # noqa: E402
from lavis_medblip.cli.demo import HELD_OUT, MODELS, Demo, ehr_regression, job_dir, pooled_evaluation  # noqa: E402


def _value(value: float) -> str:
    return f"{value:g}"


def terse_note(ehr: dict[str, Any]) -> str:
    """``"71.8 y/o man, 18 yrs education. MMSE 25. CDR 0."``"""
    who = " ".join(part for part in (f"{_value(ehr['age'])} y/o" if ehr.get("age") is not None else "",
                                     {"male": "man", "female": "woman"}.get(sex_of(ehr.get("sex")), "")) if part)
    text = (who or "Patient") + (f", {ehr['education_years']} yrs education" if ehr.get("education_years") else "")
    text += "." + (f" MMSE {_value(ehr['mmse'])}." if ehr.get("mmse") is not None else "")
    return text + (f" CDR {_value(ehr['cdr_global'])}." if ehr.get("cdr_global") is not None else "")


def key_value_list(ehr: dict[str, Any]) -> str:
    """``"Age: 71.8; Sex: M; Education (years): 18; MMSE: 25; CDR: 0."``"""
    names = {"age": "Age", "sex": "Sex", "education_years": "Education (years)", "mmse": "MMSE", "cdr_global": "CDR"}
    return "; ".join(f"{name}: {_value(ehr[key]) if isinstance(ehr[key], (int, float)) else ehr[key]}"
                     for key, name in names.items() if ehr.get(key) is not None) + "."


def narrative(ehr: dict[str, Any]) -> str:
    """``"The patient is a man aged 71.8 who completed 18 years of schooling. On testing, the Mini-Mental State
    Examination score was 25 out of 30 and the global Clinical Dementia Rating was 0."``"""
    text = "The patient is " + {"male": "a man", "female": "a woman"}.get(sex_of(ehr.get("sex")), "a person")
    text += f" aged {_value(ehr['age'])}" if ehr.get("age") is not None else ""
    text += f" who completed {ehr['education_years']} years of schooling." if ehr.get("education_years") else "."
    tests = ([f"the Mini-Mental State Examination score was {_value(ehr['mmse'])} out of 30"] if ehr.get("mmse")
             is not None else []) + ([f"the global Clinical Dementia Rating was {_value(ehr['cdr_global'])}"]
                                     if ehr.get("cdr_global") is not None else [])
    return text + (" On testing, " + " and ".join(tests) + "." if tests else "")


# Four more, written from the field list alone by someone who had not seen ``add_score_stages`` (2026-12-07).
def _sex_letter(ehr: dict[str, Any]) -> str | None:
    return {"male": "M", "female": "F"}.get(sex_of(ehr.get("sex")))


def _cdr(ehr: dict[str, Any]) -> str:
    return _value(float(ehr["cdr_global"]))


def clinic_letter(ehr: dict[str, Any]) -> str:
    """``"I saw this 72.1-year-old woman with 16 years of formal education in the memory clinic today. She scored 24
    on the MMSE, and her global Clinical Dementia Rating was 0.5."``"""
    sex = _sex_letter(ehr)
    noun, pronoun, possessive = {"F": ("woman", "She", "her"), "M": ("man", "He", "his")}.get(
        sex, ("patient", "The patient", "the"))
    who = f"this {float(ehr['age']):.1f}-year-old {noun}" if ehr.get("age") is not None else f"this {noun}"
    years = ehr.get("education_years")
    education = "" if years is None else f" with {years} year{'' if years == 1 else 's'} of formal education"
    text = f"I saw {who}{education} in the memory clinic today."
    mmse, cdr = ehr.get("mmse"), ehr.get("cdr_global")
    rating = f"Clinical Dementia Rating was {_cdr(ehr)}" if cdr is not None else ""
    if mmse is not None and cdr is not None:
        return f"{text} {pronoun} scored {mmse} on the MMSE, and {possessive} global {rating}."
    if mmse is not None:
        return f"{text} {pronoun} scored {mmse} on the MMSE."
    return text + (f" {possessive.capitalize()} global {rating}." if cdr is not None else "")


def registry_export(ehr: dict[str, Any]) -> str:
    """``"AGE_YRS=72.1 | SEX=F | EDUC_YRS=16 | MMSE_TOTAL=24 | CDR_GLOBAL=0.5"``"""
    sex = _sex_letter(ehr)
    fields = [f"AGE_YRS={float(ehr['age']):.1f}" if ehr.get("age") is not None else "", f"SEX={sex}" if sex else "",
              f"EDUC_YRS={ehr['education_years']}" if ehr.get("education_years") is not None else "",
              f"MMSE_TOTAL={ehr['mmse']}" if ehr.get("mmse") is not None else "",
              f"CDR_GLOBAL={_cdr(ehr)}" if ehr.get("cdr_global") is not None else ""]
    return " | ".join(field for field in fields if field) or "NO_FIELDS_RECORDED"


def progress_note(ehr: dict[str, Any]) -> str:
    """``"Pt 72.1yo F, edu 16y. MMSE 24/30, CDR-GS=0.5."``"""
    sex = _sex_letter(ehr)
    patient = "Pt" + (f" {float(ehr['age']):.1f}yo" if ehr.get("age") is not None else "") + (f" {sex}" if sex else "")
    patient += f", edu {ehr['education_years']}y" if ehr.get("education_years") is not None else ""
    scores = ([f"MMSE {ehr['mmse']}/30"] if ehr.get("mmse") is not None else []) + (
        [f"CDR-GS={_cdr(ehr)}"] if ehr.get("cdr_global") is not None else [])
    return ("Pt seen" if patient == "Pt" else patient) + "." + (" " + ", ".join(scores) + "." if scores else "")


def visit_summary(ehr: dict[str, Any]) -> str:
    """``"Visit summary: age 72.1 years; female; education 16 years; Mini-Mental State Examination: 24 points;
    Clinical Dementia Rating (global): 0.5."``"""
    def counted(number: int, word: str) -> str:
        return f"{number} {word}" + ("" if number == 1 else "s")

    items = [f"age {float(ehr['age']):.1f} years" if ehr.get("age") is not None else "", sex_of(ehr.get("sex")) or "",
             f"education {counted(ehr['education_years'], 'year')}" if ehr.get("education_years") is not None else "",
             f"Mini-Mental State Examination: {counted(ehr['mmse'], 'point')}" if ehr.get("mmse") is not None else "",
             f"Clinical Dementia Rating (global): {_cdr(ehr)}" if ehr.get("cdr_global") is not None else ""]
    items = [item for item in items if item]
    return "Visit summary: " + "; ".join(items) + "." if items else "Visit summary: no values recorded."


#: ``--phrasings`` → name → how it writes a record's EHR fields. ``independent``: written without knowing what
#: ``add_score_stages`` recognises, the fairer test of it.
PHRASINGS: dict[str, dict[str, Callable[[dict[str, Any]], str]]] = {
    "own": {"terse note": terse_note, "key-value list": key_value_list, "narrative": narrative},
    "independent": {"clinic letter": clinic_letter, "registry export": registry_export,
                    "progress note": progress_note, "visit summary": visit_summary}}
#: The models that read the text, and their rows' names.
TEXT_READERS = {"text_only": "text only (LM)", "image_text": "image + text"}


def held_out_sets(demo: Demo) -> dict[str, Path]:
    """Set name → annotation file: the demo's held-out sets and those of every fresh-subject cohort under its root."""
    sets = {split: demo.cohort / f"{split}.jsonl" for split in HELD_OUT}
    for folder in sorted(demo.root.glob("fresh_subjects_seed*")):
        sets.update({f"{split}_{folder.name}": folder / f"{split}.jsonl" for split in HELD_OUT
                     if (folder / f"{split}.jsonl").exists()})
    return sets


def rephrased(sets: dict[str, Path], write: Callable[[dict[str, Any]], str] | None, folder: Path) -> dict[str, Path]:
    """Copies of ``sets`` in ``folder`` whose text ``write`` wrote from each record's EHR fields (images absolute)."""
    if write is None:
        return sets
    copies = {}
    for name, path in sets.items():
        records = [replace(record, text=write(record.ehr), image=str((path.parent / record.image).resolve()))
                   for record in read_annotations(path)]
        copies[name] = folder / f"{name}.jsonl"
        write_annotations(copies[name], records)
    return copies


def set_kind(name: str) -> str:
    """The held-out set that a set is one of: ``test_anatomy_fresh_subjects_seed7`` → ``test_anatomy``."""
    return max((split for split in HELD_OUT if name == split or name.startswith(f"{split}_")), key=len)


def pooled_balanced_accuracy(evaluations: dict[str, dict]) -> dict[str, float]:
    """Held-out set → balanced accuracy over every cohort's set of that kind."""
    def pooled(split: str) -> dict:
        return pooled_evaluation({name: e for name, e in evaluations.items() if set_kind(name) == split})

    return {split: pooled(split)["metrics"]["balanced_accuracy"] for split in HELD_OUT}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(".cache/demo"), help="a finished make demo's folder")
    parser.add_argument("--phrasings", nargs="+", choices=list(PHRASINGS), default=list(PHRASINGS),
                        help="which phrasings, beside the builders' sentence")
    args = parser.parse_args(argv)
    start = time.time()
    demo = Demo(args.root)
    sets = held_out_sets(demo)
    first = next(read_annotations(sets["test"]))
    results: dict[tuple[str, str], dict[str, dict[str, float]]] = {}
    phrasings = {"the builders' sentence": None}
    for group in args.phrasings:
        phrasings.update(PHRASINGS[group])
    for phrasing, write in phrasings.items():
        print(f"{phrasing}: {first.text if write is None else write(first.ehr)}")
        slug = phrasing.replace(" ", "_").replace("'", "")
        copies = rephrased(sets, write, demo.root / "ehr_phrasings" / slug)
        for stages in ((True,) if write is None else (True, False)):
            key = (phrasing, "in it" if write is None else ("on" if stages else "off"))
            for model in TEXT_READERS:
                checkpoint = job_dir(demo.runs / model) / "checkpoint_latest.pth"
                options = [*MODELS[model], *(f"datasets.brain_mri.text_processor.{kind}.score_stages={stages}"
                                              for kind in ("train", "eval"))]
                name = f"{model}_phrasing_{slug}_stages_{key[1].replace(' ', '_')}"
                evaluations = demo.evaluate(name, checkpoint, options, copies)
                results.setdefault(key, {})[model] = pooled_balanced_accuracy(evaluations)
    regression = pooled_balanced_accuracy(ehr_regression(demo.cohort / "train.jsonl", sets))

    per_set = {split: sum(1 for _ in read_annotations(path)) for split, path in sets.items() if split in HELD_OUT}
    print(f"\nEHR text in other words: balanced accuracy, {' / '.join(HELD_OUT.values())} "
          f"({len(sets) // len(HELD_OUT)} cohort(s) pooled, {per_set['test']} subjects per set in the demo's)")
    print(f"{'phrasing':<24}{'stage notes':>12}" + "".join(f"{title:>22}" for title in TEXT_READERS.values()))
    for (phrasing, stages), row in results.items():
        print(f"{phrasing:<24}{stages:>12}" + "".join(
            f"{' / '.join(f'{row[model][split]:.3f}' for split in HELD_OUT):>22}" for model in TEXT_READERS))
    regression_cells = " / ".join(f"{regression[split]:.3f}" for split in HELD_OUT)
    print(f"{'EHR regression (reads the fields, not the text)':<58}{regression_cells}")
    output = demo.root / "ehr_phrasings.json"
    output.write_text(json.dumps({"rows": [{"phrasing": p, "stage_notes": s, **row} for (p, s), row in results.items()],
                                  "ehr_regression": regression}, indent=2) + "\n")
    print(f"metrics: {output}  ({(time.time() - start) / 60:.1f} min)")


if __name__ == "__main__":
    main()
