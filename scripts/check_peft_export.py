"""PEFT loads what jaxlora exports: train + export an adapter with jaxlora, load it with
peft.PeftModel.from_pretrained, compare the logits (needs an interpreter with torch,
transformers and peft: --peft_python).

    python scripts/check_peft_export.py --peft_python=/path/to/python-with-peft
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxlora.formats.peft_interop import check_peft_export  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "base",
    os.path.join("tests", "fixtures", "golden", "base"),
    "HF Llama checkpoint directory (default: the golden fixture's tiny base)",
)
flags.DEFINE_string("peft_python", sys.executable, "Python with torch, transformers and peft")
flags.DEFINE_float("tolerance", 1e-4, "largest accepted max|diff| / max|logits| (fp32)")


def main(argv):
    del argv
    with tempfile.TemporaryDirectory() as work:
        result = check_peft_export(FLAGS.base, work, peft_python=FLAGS.peft_python)
    result.pop("adapter_dir")
    print(json.dumps(result, indent=1))
    if not result["relative_error"] <= FLAGS.tolerance:
        raise SystemExit(
            f"PEFT's logits differ from jaxlora's: {result['relative_error']:.3g} "
            f"> {FLAGS.tolerance}"
        )


if __name__ == "__main__":
    app.run(main)
