"""Write a synthetic stage-1 alignment file in the LLaVA-Med schema, for scale benchmarks.

Records look like ``llava_med_alignment_500k.json`` (``id``, ``image``, ``conversations`` with a short
describe-the-figure instruction ending in ``\\n<image>`` and a caption of 10-400 words, long-tailed
like PubMed Central captions). A small pool of images is reused so the image folder stays small:
copied from ``data/sample/images/`` when present, else PNG noise images. Deterministic under ``--seed``.

    python benchmarks/make_synthetic_alignment.py --out /tmp/synth/alignment.json --n 500000
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SAMPLE_IMAGES = REPO / "data" / "sample" / "images"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".gif", ".bmp"}

INSTRUCTIONS = [
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the figure's key features.",
    "Relay a brief, clear account of the picture shown.",
    "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the figure.",
    "Create a compact narrative representing the image presented.",
]

# Our own list of terms (nouns, adjectives, verbs, function words) common in figure captions.
WORDS = """
the of and in with a to for from at by on as or is are was were shows showing shown demonstrates
reveals indicates arrow arrows arrowhead asterisk panel panels left right upper lower middle inset
magnification scale bar representative image images figure section sections staining stained
hematoxylin eosin immunohistochemical immunohistochemistry positive negative expression nuclear
cytoplasmic membranous diffuse focal patchy strong weak moderate intensity tumor tumour cells cell
carcinoma adenocarcinoma lymphoma sarcoma metastasis metastatic lesion lesions mass nodule nodules
cyst cystic solid necrosis necrotic hemorrhage fibrosis inflammation inflammatory infiltrate
lymphocytes macrophages neutrophils plasma epithelial epithelium stroma stromal glandular gland
duct vessel vessels vascular endothelial capillary artery arterial vein venous aorta aortic
thrombus embolism aneurysm stenosis occlusion computed tomography CT MRI magnetic resonance
T1-weighted T2-weighted FLAIR diffusion-weighted contrast-enhanced enhancement axial coronal
sagittal plane view scan scans radiograph radiography chest abdominal pelvic cranial brain
cerebral cortex cortical white matter gray hippocampus ventricle ventricular lung lungs pulmonary
pleural effusion consolidation opacity opacities ground-glass liver hepatic kidney renal spleen
pancreas pancreatic bowel colon colonic gastric stomach esophagus bladder prostate breast thyroid
bone bones marrow fracture joint spine spinal vertebral cartilage muscle skin dermal epidermis
ultrasound echocardiography Doppler heart cardiac myocardial atrial valve coronary angiography
patient patients year-old male female man woman child before after treatment therapy surgery
resection biopsy specimen follow-up baseline months weeks days postoperative preoperative
control group groups mice mouse rats rat wild-type knockout mutant vivo vitro culture cultured
fluorescence confocal microscopy electron micrograph immunofluorescence DAPI GFP labeled
antibody antigen protein proteins gene genes mRNA expression levels quantification analysis
mean standard deviation error significant significantly compared versus increased decreased
reduced elevated higher lower normal abnormal healthy disease diseased region regions area
areas margin margins border boundary size diameter thickness volume density signal hyperintense
hypointense hyperechoic hypoechoic heterogeneous homogeneous irregular well-defined ill-defined
large small multiple single bilateral unilateral anterior posterior medial lateral proximal
distal superior inferior dorsal ventral wall lumen surface layer layers
""".split()
CONNECTORS = [
    "(A)",
    "(B)",
    "(C)",
    "(D)",
    "(E)",
    "(F)",
    "n=6",
    "n=12",
    "P<0.05",
    "P<0.01",
    "×400",
    "×200",
]


def caption_lengths(rng: random.Random, n: int, lo: int, hi: int) -> list[int]:
    """Long-tailed word counts in [lo, hi]: log-normal with median ~50 words (mean ~70)."""
    mu, sigma = math.log(50), 0.8
    return [min(hi, max(lo, round(rng.lognormvariate(mu, sigma)))) for _ in range(n)]


def make_caption(rng: random.Random, n_words: int) -> str:
    words = rng.choices(WORDS, k=n_words)
    # Sentence breaks every ~8-25 words; sprinkle panel labels and statistics.
    pos, sentences = 0, []
    while pos < n_words:
        end = min(n_words, pos + rng.randint(8, 25))
        chunk = words[pos:end]
        if rng.random() < 0.3:
            chunk[rng.randrange(len(chunk))] = rng.choice(CONNECTORS)
        chunk[0] = chunk[0][:1].upper() + chunk[0][1:]
        sentences.append(" ".join(chunk) + ".")
        pos = end
    return " ".join(sentences)


def prepare_images(image_dir: Path, n_images: int, rng: random.Random) -> list[str]:
    """Fill ``image_dir`` with up to ``n_images`` images; returns their file names."""
    image_dir.mkdir(parents=True, exist_ok=True)
    sources = sorted(p for p in SAMPLE_IMAGES.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if sources:
        names = []
        for src in sources[:n_images]:
            shutil.copy2(src, image_dir / src.name)
            names.append(src.name)
        return names
    names = []
    for i in range(n_images):
        w, h = rng.choice([(224, 224), (336, 336), (320, 240), (256, 384), (400, 300)])
        Image.frombytes("RGB", (w, h), rng.randbytes(w * h * 3)).save(image_dir / f"noise_{i:04d}.png")
        names.append(f"noise_{i:04d}.png")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output .json (a JSON list) or .jsonl")
    parser.add_argument(
        "--image-dir", type=Path, default=None, help="image folder (default: <out dir>/images)"
    )
    parser.add_argument("--n", type=int, default=500_000, help="number of records (default 500000)")
    parser.add_argument("--n-images", type=int, default=16, help="size of the reused image pool")
    parser.add_argument("--min-words", type=int, default=10)
    parser.add_argument("--max-words", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.n < 0 or args.n_images < 1 or not 1 <= args.min_words <= args.max_words:
        parser.error("need --n >= 0, --n-images >= 1 and 1 <= --min-words <= --max-words")

    start = time.perf_counter()
    rng = random.Random(args.seed)
    image_dir = args.image_dir or args.out.parent / "images"
    images = prepare_images(image_dir, args.n_images, random.Random(args.seed + 1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    jsonl = args.out.suffix == ".jsonl"
    lengths = caption_lengths(rng, args.n, args.min_words, args.max_words)
    pmids = rng.sample(range(10_000_000, 40_000_000), args.n) if args.n else []
    dumps = json.JSONEncoder(ensure_ascii=False, separators=(", ", ": ")).encode
    tmp = args.out.with_name(args.out.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write("" if jsonl else "[\n")
        buf: list[str] = []
        for i in range(args.n):
            record = {
                "id": f"{pmids[i]}_F{1 + i % 7}",
                "image": images[i % len(images)],
                "conversations": [
                    {"from": "human", "value": f"{rng.choice(INSTRUCTIONS)}\n<image>"},
                    {"from": "gpt", "value": make_caption(rng, lengths[i])},
                ],
            }
            buf.append(dumps(record))
            if len(buf) == 10_000 or i == args.n - 1:
                sep = "\n" if jsonl else ",\n"
                f.write(sep.join(buf) + ("\n" if jsonl else (",\n" if i < args.n - 1 else "\n")))
                buf.clear()
        f.write("" if jsonl else "]\n")
    tmp.replace(args.out)
    elapsed = time.perf_counter() - start
    size = args.out.stat().st_size
    img_size = sum(p.stat().st_size for p in image_dir.iterdir() if p.is_file())
    mean_words = sum(lengths) / max(1, len(lengths))
    print(f"wrote {args.n} records to {args.out} ({size / 1e6:.1f} MB, mean caption {mean_words:.0f} words)")
    print(f"images: {len(images)} in {image_dir} ({img_size / 1e6:.1f} MB); {elapsed:.1f}s, seed {args.seed}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
