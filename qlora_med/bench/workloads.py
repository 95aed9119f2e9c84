"""The bench's two workloads, written as LLaVA-Med records on disk so every variant reads the same samples its own way.

* ``align`` (stage 1, figure captions): one image and one caption per sample, like PMC figure captions (LLaVA-Med's
  alignment set). Caption length in Mistral tokens: log-normal, median 64, sigma 0.85 (p10 ~22, p90 ~190), clipped
  to [12, 512]. This is an assumption modelled on PMC-style captions, not a measurement of the 500K set.
* ``instruct`` (stage 2): 1-5 round conversations about one image (rounds weighted 30/25/20/15/10 %, fewer when
  the conversation is short). Text tokens per conversation: log-normal, median 330, sigma 0.68, clipped to [48, 1700];
  with the template's ``[INST]`` markers that is a median of ~360 and a p90 of ~830 tokens. Questions take 8-30
  tokens each (some carry a sentence of context), the answers share the rest. Image tokens (256 at 224 px, 576 at
  336 px) come on top.

Lengths are drawn as evenly spaced quantiles of those distributions (then shuffled), so even the 16 samples of a
short run follow them; :func:`length_stats` reports what the kit's template actually made of them. The text is
synthetic but reads like radiology / pathology reports (findings, anatomy, stains, measurements, differentials),
generated deterministically from ``seed``: no network, no dataset download.

Images are real: the ten in ``data/sample/images`` (RGB, greyscale, RGBA; 102-256 px) and scikit-image's bundled
biomedical images at full size with figure-like non-square crops (immunohistochemistry 512 px, retina 1411 px,
cells 660 x 550, a CT phantom), so decoding, padding to square and resizing cost what they cost on real figures.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

SAMPLE_IMAGES = Path(__file__).resolve().parents[2] / "data" / "sample" / "images"
MIXES = ("align", "instruct")


@dataclass(frozen=True)
class LengthModel:
    """Log-normal text length in tokens, clipped."""

    median: float
    sigma: float
    low: int
    high: int

    def quantiles(self, n: int, rng: random.Random) -> list[int]:
        """``n`` lengths at evenly spaced quantiles (i + 0.5) / n, shuffled."""
        z = [NormalDist().inv_cdf((i + 0.5) / n) for i in range(n)]
        values = [min(self.high, max(self.low, round(self.median * math.exp(self.sigma * v)))) for v in z]
        rng.shuffle(values)
        return values

    def percentile(self, q: float) -> float:
        return self.median * math.exp(self.sigma * NormalDist().inv_cdf(q))


CAPTION = LengthModel(median=64, sigma=0.85, low=12, high=512)
CONVERSATION = LengthModel(median=330, sigma=0.68, low=48, high=1700)  # + ~30 template tokens: median ~360
ROUND_WEIGHTS = (30, 25, 20, 15, 10)  # 1..5 rounds

# ----------------------------------------------------------------------------- synthetic medical text

MODALITY = ["Axial contrast-enhanced CT", "Coronal CT", "Sagittal T2-weighted MRI", "Axial FLAIR MRI",
            "Posteroanterior chest radiograph", "Portable chest radiograph", "Transabdominal ultrasound",
            "Hematoxylin and eosin stained section", "Immunohistochemical staining", "Fundus photograph",
            "Fluorescence micrograph", "Transmission electron micrograph", "Contrast-enhanced T1-weighted MRI",
            "Diffusion-weighted MRI", "Gross photograph of the resected specimen", "PET-CT fusion image"]  # fmt: skip
ANATOMY = ["right upper lobe", "left lower lobe", "liver", "pancreatic head", "left kidney", "abdominal aorta",
           "right frontal lobe", "cerebellum", "thyroid gland", "colonic mucosa", "gastric antrum", "left ventricle",
           "mediastinum", "retina", "optic disc", "lumbar spine", "right breast", "prostate", "bladder wall",
           "small bowel", "spleen", "adrenal gland", "skin", "lymph node", "bone marrow"]  # fmt: skip
FINDING = ["a well-circumscribed hypodense lesion", "an irregular spiculated mass", "diffuse ground-glass opacities",
           "a rim-enhancing fluid collection", "multiple microaneurysms", "free air under the hemidiaphragm",
           "a fusiform aneurysm", "nests of atypical squamous cells with keratin pearls", "crypt architectural "
           "distortion", "a heterogeneously enhancing mass", "periventricular white matter hyperintensities",
           "a layering pleural effusion", "dilated bowel loops with air-fluid levels", "a calcified nodule",
           "scattered hard exudates", "marked nuclear pleomorphism", "a thickened gallbladder wall",
           "restricted diffusion", "cortical thinning", "increased FDG uptake", "granulomatous inflammation",
           "a lytic lesion with a narrow zone of transition", "intraductal papillary proliferation"]  # fmt: skip
DESCRIPTOR = ["measuring approximately {n} mm", "with surrounding edema", "without evidence of invasion",
              "abutting the adjacent vessels", "with central necrosis", "and mild mass effect",
              "with a few mitotic figures per high-power field", "and no lymphadenopathy",
              "with strong membranous staining", "and preserved fat planes", "with peripheral calcification",
              "extending into the surrounding fat"]  # fmt: skip
DIAGNOSIS = ["hepatocellular carcinoma", "a simple cyst", "squamous cell carcinoma", "diabetic retinopathy",
             "an abdominal aortic aneurysm", "community-acquired pneumonia", "small bowel obstruction",
             "glioblastoma", "metastatic disease", "acute cholecystitis", "sarcoidosis", "ulcerative colitis",
             "a pneumoperitoneum from a perforated viscus", "multiple sclerosis", "renal cell carcinoma",
             "ductal carcinoma in situ", "osteosarcoma", "a benign adenoma", "tuberculosis"]  # fmt: skip
STAIN = ["DAB chromogen with hematoxylin counterstain", "Ki-67", "CD20", "cytokeratin AE1/AE3", "p53", "PAS",
         "Masson trichrome", "S-100", "HER2"]  # fmt: skip
CLINICAL = ["the clinical history", "prior imaging", "serum tumour markers", "a biopsy", "follow-up imaging in "
            "three months", "the laboratory findings", "a multidisciplinary review"]  # fmt: skip

CAPTION_SENTENCES = [
    "{modality} of the {anatomy} showing {finding} {descriptor}.",
    "The arrow marks {finding} in the {anatomy}.",
    "Staining with {stain} highlights {finding}.",
    "Scale bar, {n} um.",
    "Inset: higher magnification of the boxed area showing {finding}.",
    "({letter}) {modality} obtained {n} days after admission demonstrates {finding}.",
    "Findings are consistent with {diagnosis}.",
]
QUESTIONS = [
    "What does this image show?", "Which imaging modality was used?", "Where is the abnormality located?",
    "Is there evidence of {finding}?", "What is the most likely diagnosis?", "How large is the lesion?",
    "What do the arrows indicate in the {anatomy}?", "Which stain was used and what does it highlight?",
    "What are the differential diagnoses?", "What would you recommend as the next step?",
    "Describe the findings in the {anatomy} in detail.", "Is the lesion benign or malignant?",
]  # fmt: skip
ANSWER_SENTENCES = [
    "The {modality_lower} demonstrates {finding} in the {anatomy}, {descriptor}.",
    "These features are most consistent with {diagnosis}.",
    "The differential diagnosis includes {diagnosis} and {diagnosis2}.",
    "There is no evidence of {finding} elsewhere in the field of view.",
    "Correlation with {clinical} is recommended.",
    "The {anatomy} otherwise appears unremarkable.",
    "Staining with {stain} is positive in the lesional cells.",
    "Compared with {clinical}, the abnormality has increased in size.",
    "This pattern is typical of {diagnosis}, although {diagnosis2} cannot be excluded.",
    "The surrounding structures, including the {anatomy}, are preserved.",
]  # fmt: skip
ALIGN_INSTRUCTIONS = ["Describe the image concisely.", "Provide a brief description of the given image.",
                      "What is shown in this figure?", "Summarize the visual content of the image.",
                      "Give a short caption for this figure."]  # fmt: skip


class TextGenerator:
    """Deterministic report-like sentences; :meth:`fill` writes about ``tokens`` tokens of them."""

    def __init__(self, tokenizer, rng: random.Random) -> None:
        self.tokenizer, self.rng = tokenizer, rng

    def _slots(self) -> dict[str, str]:
        r = self.rng
        modality = r.choice(MODALITY)
        return {"modality": modality, "modality_lower": modality[0].lower() + modality[1:], "anatomy": r.choice(ANATOMY),
                "finding": r.choice(FINDING), "descriptor": r.choice(DESCRIPTOR).format(n=r.randint(3, 90)),
                "diagnosis": r.choice(DIAGNOSIS), "diagnosis2": r.choice(DIAGNOSIS), "stain": r.choice(STAIN),
                "clinical": r.choice(CLINICAL), "n": str(r.randint(2, 200)), "letter": r.choice("ABCDEF")}  # fmt: skip

    def sentence(self, templates: list[str]) -> str:
        return self.rng.choice(templates).format(**self._slots())

    def count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def fill(self, tokens: int, templates: list[str]) -> str:
        """Sentences until about ``tokens`` tokens; the last one cut at a word to land near the target."""
        text, n = "", 0
        while n < tokens:
            piece = self.sentence(templates)
            k = self.count(piece)
            if n + k > tokens:
                words = piece.split()
                piece = " ".join(words[: max(1, round(len(words) * (tokens - n) / k))])
            text, n = (f"{text} {piece}" if text else piece), n + k
        return text


def _conversation(gen: TextGenerator, total: int) -> list[tuple[str, str]]:
    rounds = gen.rng.choices(range(1, 6), weights=ROUND_WEIGHTS)[0]
    rounds = max(1, min(rounds, total // 40))  # a short conversation cannot hold five rounds
    questions = [gen.sentence(QUESTIONS) for _ in range(rounds)]
    if gen.rng.random() < 0.3:  # some questions carry context, as GPT-4 generated ones do
        questions[0] = f"{gen.fill(gen.rng.randint(10, 25), ANSWER_SENTENCES)} {questions[0]}"
    left = max(8 * rounds, total - sum(gen.count(q) for q in questions))
    shares = [gen.rng.uniform(0.5, 1.5) for _ in range(rounds)]
    return [(q, gen.fill(max(4, round(left * s / sum(shares))), ANSWER_SENTENCES))
            for q, s in zip(questions, shares, strict=True)]  # fmt: skip


def _records(mix: str, n: int, tokenizer, images: list[str], seed: int) -> list[dict]:
    rng = random.Random(f"{mix}-{seed}")
    gen = TextGenerator(tokenizer, rng)
    order = list(images)
    rng.shuffle(order)
    records = []
    for i, length in enumerate((CAPTION if mix == "align" else CONVERSATION).quantiles(n, rng)):
        if mix == "align":
            turns = [(rng.choice(ALIGN_INSTRUCTIONS), gen.fill(length, CAPTION_SENTENCES))]
        else:
            turns = _conversation(gen, length)
        conversations = []
        for r, (q, a) in enumerate(turns):
            q = (f"<image>\n{q}" if rng.random() < 0.5 else f"{q}\n<image>") if r == 0 else q
            conversations += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        records.append({"id": f"{mix}-{i:04d}", "image": order[i % len(order)], "conversations": conversations})
    return records


# ----------------------------------------------------------------------------- images


def _skimage_images(out: Path) -> list[str]:
    """scikit-image's bundled biomedical images, full size, with figure-like non-square crops."""
    import numpy as np
    from PIL import Image
    from skimage import data

    phantom = (data.shepp_logan_phantom() * 255).clip(0, 255).astype(np.uint8)
    ihc, retina = data.immunohistochemistry(), data.retina()
    crops = {
        "ihc_wide.png": ihc[88:424], "ihc_tall.png": ihc[:, 106:406], "ihc_full.png": ihc,
        "retina_wide.jpg": retina[235:1175], "retina_full.jpg": retina, "cells_660x550.png": data.cell(),
        "phantom_wide.png": phantom[60:340], "microaneurysms.png": data.microaneurysms(),
    }  # fmt: skip
    for name, array in crops.items():
        Image.fromarray(array).save(out / name, quality=92)
    return sorted(crops)


def write_workload(out: Path, tokenizer, samples: int, seed: int = 0) -> dict[str, Path]:
    """Write ``images/`` and one ``<mix>.json`` per mix (``samples`` records each) under ``out``; returns the paths."""
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    names = []
    for path in sorted(SAMPLE_IMAGES.iterdir()):
        shutil.copy(path, images / path.name)
        names.append(path.name)
    names += _skimage_images(images)
    paths = {"images": images}
    for mix in MIXES:
        paths[mix] = out / f"{mix}.json"
        paths[mix].write_text(json.dumps(_records(mix, samples, tokenizer, names, seed), indent=1))
    return paths


def _pct(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))])


def length_stats(records: list[dict], processor, template: str, image_tokens: int, max_length: int) -> dict:
    """Text and total (with image tokens) lengths of ``records`` through the kit's template, and the images' sizes."""
    from qlora_med.prompts.templates import encode_batch, render

    tok = processor.tokenizer
    rendered = [render(template, [(t["value"], n["value"]) for t, n in zip(r["conversations"][::2],
                                                                          r["conversations"][1::2], strict=True)],
                       "<image>", tok.bos_token, tok.eos_token) for r in records]  # fmt: skip
    batch = encode_batch(tok, rendered, tok.convert_tokens_to_ids("<image>"), image_tokens, max_length)
    totals = batch.num_tokens.tolist()
    text = [t - image_tokens for t in totals]
    labelled = batch.answer_tokens.tolist()
    rounds = [len(r["conversations"]) // 2 for r in records]
    return {
        "samples": len(records), "template": template, "image_tokens": image_tokens,
        "text_tokens": {"median": _pct(text, 0.5), "p10": _pct(text, 0.1), "p90": _pct(text, 0.9),
                        "max": max(text), "mean": sum(text) / len(text)},
        "total_tokens": {"median": _pct(totals, 0.5), "p90": _pct(totals, 0.9), "max": max(totals)},
        "labelled_share": sum(labelled) / sum(min(t, max_length) for t in totals),
        "rounds": {k: rounds.count(k) for k in sorted(set(rounds))},
        "truncated": sum(t > max_length for t in totals),
    }  # fmt: skip


def image_sizes(images: Path) -> list[tuple[str, int, int]]:
    from PIL import Image

    out = []
    for path in sorted(images.iterdir()):
        with Image.open(path) as img:
            out.append((path.name, *img.size))
    return out


def fixed_length_records(tokenizer, n: int, text_tokens: int, images: list[str], seed: int = 0) -> list[dict]:
    """``n`` one-round conversations of about ``text_tokens`` answer tokens each (e.g. to fill a 2048-token context)."""
    rng = random.Random(f"fixed-{seed}")
    gen = TextGenerator(tokenizer, rng)
    return [{"id": f"fixed-{i:04d}", "image": images[i % len(images)],
             "conversations": [{"from": "human", "value": f"<image>\n{gen.sentence(QUESTIONS)}"},
                               {"from": "gpt", "value": gen.fill(text_tokens, ANSWER_SENTENCES)}]}
            for i in range(n)]  # fmt: skip
