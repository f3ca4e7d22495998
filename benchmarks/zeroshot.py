"""Zero-shot diagnosis latency per case: ranking the 3 class answers vs generating an answer,
then throughput at several batch sizes with the share of each part.

* ``ranking``     ``predict_answers`` over the class answers (one LM pass over the prompt and the 3 answers);
* ``generation``  ``generate``, greedy, ``--max-new-tokens`` (default 8);
* ``LM pass``     ms of one LM pass over 1 to 96 tokens, fitted as fixed + per token: what bounds the two above;
* ``multiple choice``  4 choices after M3D-VQA's closed-ended prompt (no EHR text, as ``m3d_vqa``), ms per case
                  at batch 1 and ``--choice-batch`` (default 8) for the three ways the LM can score them: one
                  sequence per choice (the ranking before shared prefixes), the prompt's key/value cache, one
                  pass over prompt and choices (what ``predict_answers`` does with this LM); all three agree;
* ``throughput``  cases/s of ranking from the file (read, preprocess, model) at ``--batch-sizes``, and the
                  share of the time in reading, preprocessing (template registration included), the vision
                  encoder, the Q-Former and the LM. Needs ``--annotations`` (synthetic cases have no file).

Cases and agreement: README, Design notes.

    python benchmarks/zeroshot.py [--cases 8] [--checkpoint .cache/demo/runs/.../checkpoint_best.pth]
        [--annotations .cache/demo/cohort/test.jsonl] [--batch-sizes 1 4 16] [--throughput-cases 32]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for train_step.synthetic_cohort
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the one-sequence-per-candidate reference

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

import lavis_medblip  # noqa: E402,F401  (registers resolvers, model, processors)
from lavis.common.registry import registry  # noqa: E402

from lavis_medblip.annotations.m3d_vqa import closed_question, format_choice  # noqa: E402
from lavis_medblip.annotations.schema import CLASS_ANSWERS, CLASS_NAMES, read_annotations  # noqa: E402
from lavis_medblip.datasets.m3d_vqa import DEFAULT_PROMPT_TEMPLATE  # noqa: E402
from lavis_medblip.models import MedBLIP  # noqa: E402
from lavis_medblip.tasks.metrics import INVALID, match_generated_answer  # noqa: E402
from test_shared_prefix_ranking import scores_one_sequence_each  # noqa: E402
from train_step import synthetic_cohort  # noqa: E402


def milliseconds(function, *args, **kwargs) -> tuple[float, float, object]:
    """Wall and CPU (all of this process's threads; robust to other jobs) milliseconds, and the result."""
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    result = function(*args, **kwargs)
    return 1000 * (time.perf_counter() - start_wall), 1000 * (time.process_time() - start_cpu), result


def annotated_cases(path: str, preprocess: OmegaConf, limit: int) -> list[dict]:
    """The first ``limit`` labelled cases of an annotation file, through the model config's eval processors."""
    processors = {kind: registry.get_processor_class(preprocess[kind].eval.name).from_config(preprocess[kind].eval)
                  for kind in ("vis_processor", "text_processor")}
    records = [record for record in read_annotations(path) if record.label is not None][:limit]
    return [{"image": processors["vis_processor"](str(Path(path).parent / record.image)),
             "text": processors["text_processor"](record.text), "label": CLASS_NAMES.index(record.label)}
            for record in records]


#: An AD-related closed-ended M3D-VQA question (the kind M3D-VQA-AD keeps), with its four choices.
M3D_QUESTION = "Which abnormality is most evident in the medial temporal lobes in this image?"
M3D_CHOICES = {"A": "Bilateral hippocampal atrophy", "B": "Acute cerebellar infarct",
               "C": "Frontal lobe glioma", "D": "No abnormality is seen"}


@contextlib.contextmanager
def answers_packed(model: MedBLIP, packed: bool):
    """``predict_answers`` with the answers in the prompt's one pass (where the LM allows it) or on the prompt's
    key/value cache: the switch the LM sets for itself once (benchmark only)."""
    lm = model.language_model
    allowed = lm.packs_answers
    lm._packs_answers = packed and allowed
    try:
        yield
    finally:
        lm._packs_answers = allowed


def multiple_choice(model: MedBLIP, cases: list[dict], batch_sizes: list[int], repeats: int) -> None:
    """ms per case of the three ways to score 4 choices, at each batch size (median of ``repeats``)."""
    prompt = DEFAULT_PROMPT_TEMPLATE.format(question=closed_question(M3D_QUESTION, M3D_CHOICES))
    choices = [format_choice(letter, choice) for letter, choice in M3D_CHOICES.items()]

    def scores(method: str, samples: dict) -> torch.Tensor:
        if method == "one sequence per choice":
            return scores_one_sequence_each(model, samples, choices)
        with answers_packed(model, method == "one pass"):
            return model.predict_answers(samples, choices).scores

    methods = ["one sequence per choice", "prompt's cache"] + (["one pass"] if model.language_model.packs_answers else [])
    print(f"\nmultiple choice: 4 choices after M3D-VQA's closed-ended prompt "
          f"({len(model.language_model.tokenize([prompt], 512)[0])} prompt tokens + {model.config.qformer.num_queries} "
          f"image tokens), ms per case, median of {repeats}")
    print(f"{'batch':>5}" + "".join(f"{method:>26}" for method in methods) + "   fastest vs one sequence per choice")
    for batch_size in batch_sizes:
        batch = (cases * batch_size)[:batch_size]
        samples = {"image": torch.stack([case["image"] for case in batch]), "text_input": [""] * batch_size,
                   "question": [prompt] * batch_size}
        with torch.no_grad():
            reference = scores(methods[0], samples)
            times = {}
            for method in methods:
                torch.testing.assert_close(scores(method, samples), reference, rtol=1e-4, atol=1e-5)
                times[method] = statistics.median(
                    milliseconds(scores, method, samples)[0] for _ in range(repeats)) / batch_size
        print(f"{batch_size:>5}" + "".join(f"{times[method]:>26.0f}" for method in methods)
              + f"   {times[methods[0]] / min(times.values()):.2f}x")


def lm_pass_cost(model: MedBLIP, lengths: tuple[int, ...] = (1, 16, 32, 64, 96), repeats: int = 7) -> None:
    """ms of one LM pass (last position's logits only) over ``lengths`` tokens, median of ``repeats``, fitted
    as fixed + per-token: what bounds ranking (one pass, longer) against generation (one pass per token)."""
    lm = model.language_model
    keep = {"logits_to_keep": 1} if lm.keeps_chosen_logits else {}
    median_ms = []
    with torch.no_grad():
        for length in lengths:
            inputs = {"inputs_embeds": torch.randn(1, length, lm.hidden_size),
                      "attention_mask": torch.ones(1, length, dtype=torch.long), **keep}
            lm.model(**inputs)  # warm-up at this shape
            median_ms.append(statistics.median(milliseconds(lm.model, **inputs)[0] for _ in range(repeats)))
    per_token, fixed = torch.linalg.lstsq(torch.tensor([[float(n), 1.0] for n in lengths]),
                                          torch.tensor(median_ms)[:, None]).solution.flatten().tolist()
    print(f"\nLM pass (no cache), ms, median of {repeats}: " + ", ".join(
        f"{n} tokens {ms:.0f}" for n, ms in zip(lengths, median_ms)) + f"; fit {fixed:.0f} ms + {per_token:.2f} ms/token")


PARTS = ("read", "preprocess", "vision", "qformer", "lm")


class PartTimer:
    """Wall seconds spent in each part; the model's parts are timed by wrapping its own methods."""

    def __init__(self, model: MedBLIP) -> None:
        self.seconds = dict.fromkeys(PARTS, 0.0)
        self._wrap(model, "_vision_tokens", "vision")
        self._wrap(model, "encode_queries", "qformer")
        self._wrap(model.language_model, "score_answers", "lm")

    @contextlib.contextmanager
    def part(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] += time.perf_counter() - start

    def _wrap(self, owner: object, method: str, name: str) -> None:
        original = getattr(owner, method)

        def timed(*args, **kwargs):
            with self.part(name):
                return original(*args, **kwargs)
        setattr(owner, method, timed)


def throughput(model: MedBLIP, preprocess: OmegaConf, annotations: str, cases: int, batch_sizes: list[int],
               answers: list[str]) -> None:
    """Cases/s of ranking from the files at each batch size, and each part's share of the time."""
    processor = registry.get_processor_class(preprocess.vis_processor.eval.name).from_config(
        preprocess.vis_processor.eval)  # no cache: every case is read and preprocessed
    text_processor = registry.get_processor_class(preprocess.text_processor.eval.name).from_config(
        preprocess.text_processor.eval)
    records = [record for record in read_annotations(annotations) if record.label is not None][:cases]
    timer = PartTimer(model)
    print(f"\nthroughput: ranking {len(answers)} answers from the files, {len(records)} cases, uncached "
          f"preprocessing, torch threads {torch.get_num_threads()}")
    print(f"{'batch':>5}{'cases/s':>9}{'ms/case':>9}  " + "".join(f"{part:>11}" for part in PARTS))
    for batch_size in batch_sizes:
        timer.seconds = dict.fromkeys(PARTS, 0.0)
        start = time.perf_counter()
        for first in range(0, len(records), batch_size):
            batch = records[first:first + batch_size]
            volumes = []
            for record in batch:
                with timer.part("read"):
                    volume = processor.read(str(Path(annotations).parent / record.image))
                with timer.part("preprocess"):
                    volumes.append(processor.deviation(processor.transform(volume).data.to(processor.dtype)))
            samples = {"image": torch.stack(volumes), "text_input": [text_processor(r.text) for r in batch]}
            model.predict_answers(samples, answers)
        seconds = time.perf_counter() - start
        shares = "".join(f"{100 * timer.seconds[part] / seconds:>10.0f}%" for part in PARTS)
        print(f"{batch_size:>5}{len(records) / seconds:>9.2f}{1000 * seconds / len(records):>9.0f}  {shares}")
    print("shares: of the wall time at that batch size (the rest: collation, prompt building, calibration)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--checkpoint", help="trainable-parameter checkpoint of a demo-type model")
    parser.add_argument("--annotations", help="take the cases from this annotation file (default: synthetic)")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16], help="throughput batch sizes")
    parser.add_argument("--throughput-cases", type=int, default=32, help="cases per throughput measurement")
    parser.add_argument("--choice-batch", type=int, default=8, help="the multiple-choice comparison's larger batch")
    parser.add_argument("--repeats", type=int, default=5, help="repeats of each multiple-choice measurement")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    demo_config = OmegaConf.load(MedBLIP.default_config_path("demo"))
    cfg = demo_config.model
    torch.manual_seed(0)
    model = MedBLIP.from_config(cfg)
    if args.checkpoint:
        model.load_checkpoint(args.checkpoint)
    model.eval()

    class_answers = [CLASS_ANSWERS[name] for name in CLASS_NAMES]
    if args.annotations:
        cases = annotated_cases(args.annotations, demo_config.preprocess, args.cases)
    else:
        cases = synthetic_cohort(args.cases, cfg.image_size, seed=1)
    sample = lambda case: {"image": case["image"][None], "text_input": [case["text"]]}  # noqa: E731
    model.predict_answers(sample(cases[0]), class_answers)  # warm-up: lazy init, allocator
    model.generate(sample(cases[0]), max_new_tokens=args.max_new_tokens)

    ranking_cpu, generation_cpu, cached_ms = [], [], []
    ranking_ms, generation_ms, agree, invalid, rank_correct, generate_correct = [], [], 0, 0, 0, 0
    for case in cases:
        elapsed, cpu, ranking = milliseconds(model.predict_answers, sample(case), class_answers)
        ranking_ms.append(elapsed)
        ranking_cpu.append(cpu)
        with answers_packed(model, False):
            cached_ms.append(milliseconds(model.predict_answers, sample(case), class_answers)[0])
        elapsed, cpu, texts = milliseconds(model.generate, sample(case), max_new_tokens=args.max_new_tokens)
        generation_ms.append(elapsed)
        generation_cpu.append(cpu)
        ranked = class_answers.index(ranking.predictions[0])
        generated = match_generated_answer(texts[0], class_answers, list(CLASS_NAMES))
        agree += generated == ranked
        invalid += generated == INVALID
        rank_correct += ranked == case["label"]
        generate_correct += generated == case["label"]

    n = len(cases)
    print(f"model_type demo{' + ' + args.checkpoint if args.checkpoint else ' (untrained Q-Former/LoRA)'}, "
          f"{n} cases, batch 1, torch threads {torch.get_num_threads()}")
    print(f"{'method':<12}{'mean ms/case':>14}{'median':>10}{'min':>10}{'CPU ms':>10}{'accuracy':>10}  notes")
    print(f"{'ranking':<12}{statistics.mean(ranking_ms):>14.0f}{statistics.median(ranking_ms):>10.0f}"
          f"{min(ranking_ms):>10.0f}{statistics.median(ranking_cpu):>10.0f}{rank_correct / n:>10.2f}  "
          f"{len(class_answers)} candidates, {'one pass over prompt and answers' if model.language_model.packs_answers else 'on the prompt cache'}")
    if model.language_model.packs_answers:
        print(f"{'  on cache':<12}{statistics.mean(cached_ms):>14.0f}{statistics.median(cached_ms):>10.0f}"
              f"{min(cached_ms):>10.0f}{'':>10}{'':>10}  the same scores with the answers on the prompt's key/value cache")
    print(f"{'generation':<12}{statistics.mean(generation_ms):>14.0f}{statistics.median(generation_ms):>10.0f}"
          f"{min(generation_ms):>10.0f}{statistics.median(generation_cpu):>10.0f}{generate_correct / n:>10.2f}  "
          f"greedy, max_new_tokens {args.max_new_tokens}; {invalid}/{n} name no single class")
    print(f"agreement (generated class == ranking's top): {agree}/{n} = {agree / n:.2f}; "
          f"generation / ranking latency: {statistics.mean(generation_ms) / statistics.mean(ranking_ms):.2f}x")
    if args.annotations:
        print(f"accuracy: against the labels of {args.annotations}")
    else:
        print("accuracy: against the synthetic labels (EHR scores follow the label; the volume is one template)")
    print(f"example generation: {texts[0]!r}")
    lm_pass_cost(model)
    multiple_choice(model, cases, [1, args.choice_batch], args.repeats)
    if args.annotations:
        throughput(model, demo_config.preprocess, args.annotations, args.throughput_cases, args.batch_sizes,
                   class_answers)


if __name__ == "__main__":
    main()
