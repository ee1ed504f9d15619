"""
The official LLaVA-1.5 recipe's weights and data, fetched and checked (used by `prepare.py --recipe llava-1.5`).

Weights and annotation files come from the Hugging Face hub (`huggingface_hub`, imported only here); the
stage 2 image sets hosted elsewhere by resumable HTTP (a `.part` file renamed only once complete); OCR-VQA is
fetched by hand. Every step leaves a marker when it finishes, so a rerun fetches only what is missing, and
`check_llava` counts, per source, the rows whose image is present. Failures are one DownloadError sentence.
"""
import http.client
import json
import os
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from nanollava.checkpoint import write_json

HUB = {  # name -> (repo, repo type, files to fetch, folder under the recipe root)
    "clip": ("openai/clip-vit-large-patch14-336", "model", ["*.json", "*.txt", "pytorch_model.bin"], "clip-vit-large-patch14-336"),
    "vicuna": ("lmsys/vicuna-{size}-v1.5", "model", ["*.json", "tokenizer.model", "*.bin"], "vicuna-{size}-v1.5"),
    "pretrain": ("liuhaotian/LLaVA-Pretrain", "dataset", ["blip_laion_cc_sbu_558k.json"], "LLaVA-Pretrain"),
    "instruct": ("liuhaotian/LLaVA-Instruct-150K", "dataset", ["llava_v1_5_mix665k.json"], "LLaVA-Instruct-150K"),
    "pretrain-images": ("liuhaotian/LLaVA-Pretrain", "dataset", ["images.zip"], "LLaVA-Pretrain"),  # stage 1's 558k images
}
IMAGE_SETS = {  # stage 2 sources, as in the official README: name -> [(url, zip unpacks into, folder it makes)]
    "coco": [("http://images.cocodataset.org/zips/train2017.zip", "coco", "coco/train2017")],
    "gqa": [("https://downloads.cs.stanford.edu/nlp/data/gqa/images.zip", "gqa", "gqa/images")],
    "textvqa": [("https://dl.fbaipublicfiles.com/textvqa/images/train_val_images.zip", "textvqa", "textvqa/train_images")],
    "vg": [("https://cs.stanford.edu/people/rak248/VG_100K_2/images.zip", "vg", "vg/VG_100K"),
           ("https://cs.stanford.edu/people/rak248/VG_100K_2/images2.zip", "vg", "vg/VG_100K_2")],
}
MANUAL = {"ocr_vqa": "ocr_vqa/images: run the official OCR-VQA download script (dataset.json and loadDataset.py, "
                     "https://drive.google.com/drive/folders/1_GYPY5UkUy7HIcR0zq3ZCFgeZN7BAfm_) and save every image as .jpg"}


class DownloadError(Exception):
    pass


def download(url, dest, chunk=1 << 20, timeout=30):
    """Fetches url to dest, resuming a partial dest.part with an HTTP Range request. The file is
    renamed to dest only once its size matches what the server announced, so an interrupted
    download is never taken for a complete one."""
    dest = Path(dest)
    if dest.exists():
        return dest
    part = Path(f"{dest}.part")
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            if have and r.status == 206:  # "bytes start-end/total"
                total = int(r.headers["Content-Range"].rsplit("/", 1)[1])
            else:  # the server ignored the range: start over
                have, total = 0, int(r.headers.get("Content-Length", -1))
            with open(part, "ab" if have else "wb") as f:
                while block := r.read(chunk):
                    f.write(block)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the range starts at the end: the .part is already whole
            os.replace(part, dest)
            return dest
        raise DownloadError(f"{url} answered HTTP {e.code}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:  # refused, reset, cut short
        raise DownloadError(f"cannot fetch {url} ({type(e).__name__}: {getattr(e, 'reason', e)}); "
                            f"run again to resume from {part}") from None
    got = part.stat().st_size
    if total >= 0 and got != total:
        raise DownloadError(f"{url} stopped at {got} of {total} bytes; run again to resume from {part}")
    os.replace(part, dest)
    return dest


def unzip(archive, into, log=print):
    """Extracts archive into a folder; a marker written last tells a finished extraction from an interrupted one."""
    marker = Path(into) / f".{Path(archive).name}.extracted"
    if not marker.exists():
        log(f"extracting {archive} into {into}")
        try:
            with zipfile.ZipFile(archive) as z:
                z.extractall(into)
        except (zipfile.BadZipFile, OSError) as e:
            raise DownloadError(f"cannot extract {archive} ({e}); delete it and run again") from None
        marker.write_text("ok\n")


def hub_fetch(name, root, size, log=print):
    """snapshot_download of one hub repo into root/<folder> (resumable, cached); a marker skips it when done."""
    repo, kind, patterns, folder = (s.format(size=size) if isinstance(s, str) else s for s in HUB[name])
    local = root / folder
    marker = local / f".{name}.complete"
    if marker.exists():
        return local
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise DownloadError("--recipe llava-1.5 downloads from the Hugging Face hub: pip install huggingface_hub") from None
    log(f"downloading {repo} into {local}")
    try:
        snapshot_download(repo, repo_type=kind, allow_patterns=patterns, local_dir=local)
    except Exception as e:  # no network, a proxy, a gated repo: one sentence, no traceback
        while e.__cause__ or e.__context__:  # the root cause: "ConnectError: [Errno 111] Connection refused"
            e = e.__cause__ or e.__context__
        why = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
        raise DownloadError(f"cannot download {repo} from the Hugging Face hub ({why}); check the network "
                            f"(or HF_ENDPOINT) and run again, finished files are kept") from None
    marker.write_text("ok\n")
    return local


def fetch_llava(root, size, image_sets, log=print):
    """Everything the recipe needs that is not there yet: the hub repos, then the image sets named."""
    for name in ["clip", "vicuna", "pretrain", "instruct"]:
        hub_fetch(name, root, size, log)
    if "pretrain" in image_sets:
        unzip(hub_fetch("pretrain-images", root, size, log) / "images.zip", root / "LLaVA-Pretrain" / "images", log)
    for name in image_sets:
        for url, into, made in IMAGE_SETS.get(name, []):
            archive = root / "downloads" / f"{name}-{Path(url).name}"
            if (root / into / f".{archive.name}.extracted").exists():
                continue
            if (root / made).is_dir() and any((root / made).iterdir()):
                log(f"{root / made} is not empty: taken as put there by hand, not downloaded")
                continue
            archive.parent.mkdir(parents=True, exist_ok=True)
            log(f"downloading {url} into {archive}")
            unzip(download(url, archive), root / into, log)


def check_llava(root, size):
    """Counts, per source, the rows whose image is present; writes filtered data files when some are
    missing and returns the manifest (paths relative to root) and what is missing, in sentences."""
    manifest = {"clip": HUB["clip"][3], "vicuna": HUB["vicuna"][3].format(size=size), "counts": {}}
    missing = []
    for key in ["clip", "vicuna"]:
        d = root / manifest[key]
        if not (d / "config.json").is_file():
            missing.append(f"{key}: {d} has no config.json (download {HUB[key][0].format(size=size)})")
    listings = {}  # folder -> set of file names, one listdir per folder

    def present(path):
        folder, name = os.path.split(path)
        if folder not in listings:
            listings[folder] = set(os.listdir(folder)) if os.path.isdir(folder) else set()
        return name in listings[folder]

    for stage, data, image_root in [("stage1", "LLaVA-Pretrain/blip_laion_cc_sbu_558k.json", "LLaVA-Pretrain/images"),
                                    ("stage2", "LLaVA-Instruct-150K/llava_v1_5_mix665k.json", ".")]:
        if not (root / data).is_file():
            missing.append(f"{stage}: {root / data} is missing")
            continue
        rows, keep, counts = json.loads((root / data).read_text()), [], {}
        for row in rows:
            source = "text" if "image" not in row else (row["image"].split("/")[0] if stage == "stage2" else "blip_laion_cc_sbu")
            c = counts.setdefault(source, {"rows": 0, "present": 0})
            c["rows"] += 1
            if "image" not in row or present(os.path.join(root, image_root, row["image"])):
                c["present"] += 1
                keep.append(row)
        if len(keep) < len(rows):
            data = data.replace(".json", ".present.json")
            write_json(keep, root / data, indent=None)
            for source, c in counts.items():
                if c["present"] < c["rows"]:
                    where = MANUAL.get(source) or next((f"{m} (from {u})" for k, sets in IMAGE_SETS.items()
                                                        for u, _, m in sets if source == k), str(root / image_root))
                    missing.append(f"{stage} {source}: {c['rows'] - c['present']} of {c['rows']} images missing; they go in {where}")
        manifest[stage] = {"data": data, "image_root": image_root}
        manifest["counts"][stage] = counts
    return manifest, missing
