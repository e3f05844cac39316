"""Peak RSS of `mor prepare` on one .txt document of N MB (issue 15's memory measurement).

    python tests/measure_prepare_memory.py SRC_DIR TOKENIZER_JSON WORKDIR 1 10 100

SRC_DIR is the ``src`` folder of the mor to measure (compare two versions side by side);
the document is Shakespeare text repeated to N MB; prepare uses the given tokenizer (no BPE
training), so what is measured is reading, tokenising and writing shards."""

import os
import subprocess
import sys
import time
from pathlib import Path

src_dir, tok, work, sizes = sys.argv[1], sys.argv[2], Path(sys.argv[3]), [int(x) for x in sys.argv[4:]]
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from mor.data.sources import _read_text_file, _shakespeare_files  # noqa: E402

text = "".join(_read_text_file(f, latin1=True) for f in _shakespeare_files()[:6]).encode()
work.mkdir(parents=True, exist_ok=True)
for mb in sizes:
    path = work / f"doc{mb}.txt"
    with open(path, "wb") as f:
        left = mb << 20
        while left > 0:
            f.write(text[:left])
            left -= len(text[:left])
    t = time.time()
    p = subprocess.Popen([sys.executable, "-m", "mor", "prepare", str(path), "--out", str(work / f"out{mb}"),
                          "--tokenizer", tok], env={**os.environ, "PYTHONPATH": src_dir},
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(p.pid, 0)
    print(f"{src_dir} {mb} MB: peak RSS {usage.ru_maxrss / 1024:.0f} MiB, {time.time() - t:.1f} s, "
          f"exit {os.waitstatus_to_exitcode(status)}", flush=True)
    path.unlink()
