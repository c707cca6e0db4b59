"""Convert a public release (M-BEIR, UMRB or ViDoRe) plus a first-stage TREC run into one minigmr suite dataset.

    python tools/convert_public.py mbeir MBEIR_ROOT OUT --set cirr_task7 --run RUN.trec --name cirr --task "IT->I" \\
        --instruction "Retrieve a day-to-day image that looks similar to the given image with the described change."
    python tools/convert_public.py umrb UMRB-OKVQA/ OUT --run RUN.trec --name okvqa --task "IT->T" --instruction ...
    python tools/convert_public.py vidore docvqa_test_subsampled_beir/ OUT --run RUN.trec --name docvqa \\
        --task "T->VD" --instruction "Find a screenshot that relevant to the user's question."
    python tools/convert_public.py vidore docvqa_test_subsampled_beir/ BEIR_OUT --beir-only   # input for a first stage

The layouts (a local copy of the Hugging Face dataset repository, e.g. `hf download --repo-type dataset ...`):
  mbeir   MBEIR_ROOT/query/test/mbeir_<set>_test.jsonl   {"qid", "query_txt", "query_img_path", "query_modality", ...}
          MBEIR_ROOT/cand_pool/local/mbeir_<set>_cand_pool.jsonl {"did", "txt", "img_path", "modality", ...}
          MBEIR_ROOT/qrels/test/mbeir_<set>_test_qrels.txt    "qid 0 did relevance task_id" (UniIR's load_qrel)
          images at MBEIR_ROOT/<img_path> (the extracted mbeir_images archive); modality "text", "image" or
          "image,text" must match the fields present.
  umrb    configs corpus (split corpus), query (split test), qrels (split test), as mteb's UMRB loader reads them:
          items `id`, `text`, `image`; qrels `query-id`, `corpus-id`, `score`.
  vidore  configs corpus (`corpus-id`, `image`), queries (`query-id`, `query`), qrels (`query-id`, `corpus-id`,
          `score`), split test (the vidore/*_beir datasets).
A parquet config is `<config>.parquet`, or the `<split>*.parquet` / `<split>/*.parquet` files under `<config>/`;
an image is the Hugging Face Image struct {bytes, path}, written out byte for byte (no re-encoding).

Each release becomes a BEIR folder (tools/beir_to_suite.py's input: corpus.jsonl, queries.jsonl, qrels/test.tsv,
images/), then the suite dataset, keeping each qrels query's first --top-k run candidates and only the documents
among them (a candidate pool has up to millions of documents). Bad input is an error naming the file and the
record (line or row, and id); the output is built beside OUT and renamed into place, so a failure leaves nothing.
pyarrow (for umrb / vidore) is an optional extra: pip install 'minigmr[formats]'.
"""
import argparse
import glob
import io
import json
import os
import shutil
import sys
import tempfile

from PIL import Image

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(TOOLS), TOOLS]  # run from anywhere; tools/ for beir_to_suite

from beir_to_suite import convert as beir_to_suite  # noqa: E402

from minigmr.data import TASK_TYPES, read_jsonl  # noqa: E402
from minigmr.metrics import rank, read_lines, read_run  # noqa: E402

# per layout: config -> (split, id column, text column, image column); None: the layout has no such column
PARQUET_LAYOUTS = {
    "umrb": {"corpus": ("corpus", "id", "text", "image"), "queries": ("test", "id", "text", "image"),
             "qrels": ("test",), "names": {"corpus": "corpus", "queries": "query", "qrels": "qrels"}},
    "vidore": {"corpus": ("test", "corpus-id", "text", "image"), "queries": ("test", "query-id", "query", None),
               "qrels": ("test",), "names": {"corpus": "corpus", "queries": "queries", "qrels": "qrels"}},
}


def record_id(value, where: str) -> str:
    """An id as a string (ViDoRe's are integers); null, blank or whitespace-holding ids are errors."""
    if value is None or isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"{where}: id must be a string or an integer, got {value!r}")
    value = str(value)
    if not value or len(value.split()) != 1 or value.strip() != value:
        raise ValueError(f"{where}: id {value!r} is empty or has whitespace, which a TREC file cannot hold")
    return value


class BeirWriter:
    """Writes a BEIR folder: corpus.jsonl / queries.jsonl (+ images/) and qrels/test.tsv."""

    def __init__(self, root: str):
        self.root, self.files, self.seen = root, {}, {"corpus": set(), "queries": set()}
        os.makedirs(os.path.join(root, "qrels"))
        for kind in ("corpus", "queries"):
            self.files[kind] = open(os.path.join(root, f"{kind}.jsonl"), "w", encoding="utf-8")

    def item(self, kind: str, item_id: str, text, image: bytes | str | None, where: str):
        """image: the file's bytes, or the path of an existing file (copied); text: None or a string."""
        if item_id in self.seen[kind]:
            raise ValueError(f"{where}: duplicate id {item_id!r}")
        self.seen[kind].add(item_id)
        if text is not None and not isinstance(text, str):
            raise ValueError(f"{where}: id {item_id!r}: text must be a string, got {type(text).__name__}")
        text = text if text and text.strip() else None
        if text is None and image is None:
            raise ValueError(f"{where}: id {item_id!r} has neither text nor image")
        record = {"_id": item_id, **({"text": text} if text else {})}
        if image is not None:
            if not isinstance(image, bytes):
                with open(image, "rb") as f:
                    image = f.read()
            data = image
            try:
                with Image.open(io.BytesIO(data)) as im:
                    im.verify()  # a truncated or non-image file fails here, not in the middle of an evaluation
                    ext = (im.format or "bin").lower()
            except Exception as e:
                raise ValueError(f"{where}: id {item_id!r}: not a readable image ({e})") from None
            record["image"] = f"images/{kind}/{len(self.seen[kind])}.{ext}"  # ids may hold ':' or '/'
            os.makedirs(os.path.join(self.root, "images", kind), exist_ok=True)
            with open(os.path.join(self.root, record["image"]), "wb") as f:
                f.write(data)
        self.files[kind].write(json.dumps(record, ensure_ascii=False) + "\n")

    def qrels(self, qrels: dict):
        for f in self.files.values():
            f.close()
        with open(os.path.join(self.root, "qrels", "test.tsv"), "w", encoding="utf-8") as f:
            f.write("query-id\tcorpus-id\tscore\n")
            for q, docs in qrels.items():
                for d, rel in docs.items():
                    f.write(f"{q}\t{d}\t{rel}\n")


def add_judgement(qrels: dict, q: str, d: str, score, where: str):
    if isinstance(score, bool) or not isinstance(score, (int, float)) or score != int(score):
        raise ValueError(f"{where}: score {score!r} is not an integer relevance grade")
    if d in qrels.setdefault(q, {}):
        raise ValueError(f"{where}: duplicate judgement for query {q!r} doc {d!r}")
    qrels[q][d] = int(score)


# ---------------------------------------------------------------------------------------------------- M-BEIR
def mbeir_files(root: str, name: str) -> tuple:
    files = (os.path.join(root, "query", "test", f"mbeir_{name}_test.jsonl"),
             os.path.join(root, "cand_pool", "local", f"mbeir_{name}_cand_pool.jsonl"),
             os.path.join(root, "qrels", "test", f"mbeir_{name}_test_qrels.txt"))
    for f in files:
        if not os.path.isfile(f):
            raise ValueError(f"{f}: not found (M-BEIR layout, --set {name})")
    return files


def read_mbeir_qrels(path: str) -> dict:
    qrels = {}
    for n, line in read_lines(path):
        cols = line.split()
        if not cols:
            continue
        if len(cols) != 5:
            raise ValueError(f"{path}:{n}: expected 5 columns 'qid 0 did relevance task_id', got {line.strip()!r}")
        try:
            score = int(cols[3])
        except ValueError:
            raise ValueError(f"{path}:{n}: relevance {cols[3]!r} is not an integer") from None
        add_judgement(qrels, cols[0], cols[2], score, f"{path}:{n}")
    return qrels


def mbeir_items(path: str, kind: str, root: str, keep, writer: BeirWriter):
    """Stream a query or candidate-pool JSONL into the writer (only ids in `keep`, when given)."""
    id_key, txt_key, img_key, mod_key = (("qid", "query_txt", "query_img_path", "query_modality") if kind == "queries"
                                         else ("did", "txt", "img_path", "modality"))
    for n, obj in read_jsonl(path):
        where = f"{path}:{n}"
        item_id = record_id(obj.get(id_key), f"{where}: {id_key!r}")
        if keep is not None and item_id not in keep:
            continue
        text, image = obj.get(txt_key), obj.get(img_key) or None
        modality = obj.get(mod_key)
        want = {"text": (True, False), "image": (False, True), "image,text": (True, True), "text,image": (True, True)}
        if modality not in want:
            raise ValueError(f"{where}: {id_key} {item_id!r}: {mod_key} {modality!r} is not one of {sorted(want)}")
        if (bool(text and str(text).strip()), image is not None) != want[modality]:
            raise ValueError(f"{where}: {id_key} {item_id!r}: {mod_key} {modality!r} but {txt_key}={text!r}, "
                             f"{img_key}={image!r}")
        if image is not None:
            image = os.path.normpath(os.path.join(root, image))
            if os.path.commonpath([image, os.path.abspath(root)]) != os.path.abspath(root) or not os.path.isfile(image):
                raise ValueError(f"{where}: {id_key} {item_id!r}: image not found under {root}: {obj[img_key]!r}")
        writer.item(kind, item_id, text, image, where)


def mbeir_to_beir(src: str, out: str, name: str, keep_docs=None):
    queries, pool, qrels_file = mbeir_files(src, name)
    qrels, writer = read_mbeir_qrels(qrels_file), BeirWriter(out)
    mbeir_items(queries, "queries", src, set(qrels), writer)
    mbeir_items(pool, "corpus", src, keep_docs, writer)
    writer.qrels(qrels)


# ---------------------------------------------------------------------------------------------------- parquet
def parquet_files(src: str, config: str, split: str) -> list:
    """The parquet files of one config and split: `<config>.parquet`, else the files under `<config>/` named
    `<split>*.parquet` or inside a `<split>/` folder (the Hub's two layouts); never another split's files."""
    flat = os.path.join(src, f"{config}.parquet")
    if os.path.isfile(flat):
        return [flat]
    files = sorted(glob.glob(os.path.join(src, config, "**", "*.parquet"), recursive=True))
    of_split = [f for f in files if os.path.basename(f).startswith(split)
                or os.path.basename(os.path.dirname(f)) == split]
    if not of_split:
        found = [os.path.relpath(f, src) for f in files] or sorted(os.listdir(src)) if os.path.isdir(src) else []
        raise ValueError(f"{src}: no {config}.parquet and no {config}/{split}*.parquet or {config}/{split}/*.parquet "
                         f"(config {config!r}, split {split!r}); found: {found or 'no such folder'}")
    return of_split


def parquet_columns(file: str) -> list:
    import pyarrow.parquet as pq  # optional: the formats extra

    try:
        return pq.read_schema(file).names
    except Exception as e:  # not a parquet file, truncated...
        raise ValueError(f"{file}: not a readable parquet file ({e})") from None


def parquet_rows(files: list, columns: list):
    """Yield (file, row number, {column: value}) reading record batches, never a whole file at once."""
    import pyarrow.parquet as pq

    for file in files:
        names = parquet_columns(file)
        pf = pq.ParquetFile(file)
        missing = [c for c in columns if c is not None and c not in names]
        if missing:
            raise ValueError(f"{file}: missing column(s) {missing}; it has {names}")
        row = 0
        for batch in pf.iter_batches(columns=[c for c in columns if c is not None], batch_size=256):
            for record in batch.to_pylist():
                yield file, row, record
                row += 1


def parquet_image(value, src: str, where: str):
    """A Hugging Face Image cell ({bytes, path} struct) -> bytes, or a path of an existing file, or None."""
    if value is None:
        return None
    if not isinstance(value, dict) or not ({"bytes", "path"} & set(value)):
        raise ValueError(f"{where}: image must be a {{bytes, path}} struct, got {type(value).__name__}")
    if value.get("bytes"):
        return value["bytes"]
    path = value.get("path") and os.path.join(src, value["path"])
    if not path or not os.path.isfile(path):
        raise ValueError(f"{where}: image has no bytes and its path {value.get('path')!r} is not a file under {src}")
    return path


def parquet_to_beir(src: str, out: str, layout: str, keep_docs=None):
    spec = PARQUET_LAYOUTS[layout]
    qrels, (split,) = {}, spec["qrels"]
    for file, row, r in parquet_rows(parquet_files(src, spec["names"]["qrels"], split),
                                     ["query-id", "corpus-id", "score"]):
        where = f"{file}: row {row}"
        add_judgement(qrels, record_id(r["query-id"], f"{where}: query-id"),
                      record_id(r["corpus-id"], f"{where}: corpus-id"), r["score"], where)
    writer = BeirWriter(out)
    for kind, keep in (("queries", set(qrels)), ("corpus", keep_docs)):
        split, id_col, text_col, image_col = spec[kind]
        files = parquet_files(src, spec["names"][kind], split)
        names = set(parquet_columns(files[0]))
        text_col, image_col = (c if c in names else None for c in (text_col, image_col))  # a set may lack one
        if text_col is None and image_col is None:
            raise ValueError(f"{files[0]}: neither a text nor an image column (looked for {spec[kind][2:]})")
        for file, row, r in parquet_rows(files, [id_col, text_col, image_col]):
            where = f"{file}: row {row}"
            item_id = record_id(r[id_col], f"{where}: {id_col}")
            if keep is None or item_id in keep:
                writer.item(kind, item_id, r.get(text_col), parquet_image(r.get(image_col), src, where), where)
    writer.qrels(qrels)


# ---------------------------------------------------------------------------------------------------- main
def needed_docs(run_file: str, qrels_ids: set, top_k: int) -> set:
    run = read_run(run_file)
    return {d for q in qrels_ids for d in rank(run.get(q, {}))[:top_k]}


def qrels_query_ids(layout: str, src: str, mbeir_set: str | None) -> set:
    if layout == "mbeir":
        return set(read_mbeir_qrels(mbeir_files(src, mbeir_set)[2]))
    spec = PARQUET_LAYOUTS[layout]
    files = parquet_files(src, spec["names"]["qrels"], spec["qrels"][0])
    return {record_id(r["query-id"], f"{f}: row {i}: query-id") for f, i, r in parquet_rows(files, ["query-id"])}


def convert(layout: str, src: str, out: str, run: str | None = None, mbeir_set: str | None = None, **suite):
    """Write OUT: a BEIR folder (run=None; returns OUT) or a suite dataset (suite: beir_to_suite.convert's keyword
    arguments; returns the loaded, validated Dataset)."""
    out = os.path.abspath(out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise FileExistsError(f"{out} already exists and is not an empty folder; remove it or choose another")
    if layout == "mbeir" and not mbeir_set:
        raise ValueError("mbeir needs --set, e.g. cirr_task7 (the <set> of mbeir_<set>_test.jsonl)")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=os.path.dirname(out))
    beir = os.path.join(tmp, "beir")
    try:
        # with a run, only the candidates a reranker will see: the qrels first, then the documents they need
        keep = None if run is None else needed_docs(run, qrels_query_ids(layout, src, mbeir_set),
                                                   suite.get("top_k", 100))
        if layout == "mbeir":
            mbeir_to_beir(src, beir, mbeir_set, keep)
        else:
            parquet_to_beir(src, beir, layout, keep)
        if run is not None:
            return beir_to_suite(beir, run, out, **suite)
        if os.path.isdir(out):
            os.rmdir(out)  # empty, checked above
        os.rename(beir, out)
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None):
    p = argparse.ArgumentParser(description="M-BEIR / UMRB / ViDoRe release + first-stage run -> minigmr suite dataset")
    p.add_argument("layout", choices=("mbeir", "umrb", "vidore"), help="the release's layout (module docstring)")
    p.add_argument("src", help="the release folder: M-BEIR's root, or the UMRB / ViDoRe dataset repository")
    p.add_argument("out", help="output folder: the suite dataset (usually SUITE/<name>), or the BEIR folder")
    p.add_argument("--set", dest="mbeir_set", help="mbeir only: the <set> of mbeir_<set>_test.jsonl, e.g. cirr_task7")
    p.add_argument("--run", help="first-stage TREC run over the whole corpus (qid Q0 docid rank score tag)")
    p.add_argument("--beir-only", action="store_true", help="write only the BEIR folder (input of a first stage)")
    p.add_argument("--name", help="dataset name, as eval.py --datasets selects it (needed with --run)")
    p.add_argument("--task", choices=TASK_TYPES, help="query->document modality, e.g. IT->T (needed with --run)")
    p.add_argument("--instruction", help="task instruction given to the reranker with every pair (needed with --run)")
    p.add_argument("--main-metric", default="ndcg@10", help="the dataset's reported number (default: ndcg@10)")
    p.add_argument("--top-k", type=int, default=100, help="candidates kept per query (default 100, as MRB)")
    p.add_argument("--source", help="free-text provenance stored in meta.json (default: layout and folder)")
    a = p.parse_args(argv)
    if a.beir_only == (a.run is not None):
        p.error("give either --run RUN.trec (a suite dataset) or --beir-only (a BEIR folder)")
    if a.run is not None and not (a.name and a.task and a.instruction):
        p.error("--run needs --name, --task and --instruction (the dataset's meta.json)")
    if a.top_k < 1:
        p.error(f"--top-k must be >= 1, got {a.top_k}")
    suite = {} if a.beir_only else dict(name=a.name, task=a.task, instruction=a.instruction, top_k=a.top_k,
                                        main_metric=a.main_metric, source=a.source or f"{a.layout}: {a.src}")
    result = convert(a.layout, a.src, a.out, a.run, a.mbeir_set, **suite)
    if a.beir_only:
        print(f"{result}: BEIR folder (corpus.jsonl, queries.jsonl, qrels/test.tsv, images/)")
    else:
        print(f"{a.out}: {len(result.queries)} queries, {len(result.corpus)} documents, "
              f"{sum(map(len, result.run.values()))} candidates")


if __name__ == "__main__":
    main()
