"""Render tests/model/data/template_goldens.json with the renderer of the checked-out commit.

The goldens in the tree were made at commit 2e95caf (the renderer before issue 13):
    PYTHONPATH=$PWD/server:/work/prebuilt/py python tools/template_goldens.py
"""

import json
import sys

sys.path.insert(0, "tests/model")
from template_corpus import CONVERSATIONS, GOLDENS, TOOLS, golden_cases, real_templates

from tinyserve.models.chat_template import ChatTemplate
from tinyserve.models.default import default_model_path

tpls = real_templates(default_model_path())
out = {}
for t, c, agp, tools in golden_cases(tpls):
    src, bos, eos = tpls[t]
    ct = ChatTemplate(src, bos_token=bos, eos_token=eos)
    kw = {"tools": TOOLS} if tools else {}
    try:
        text = ct.render(CONVERSATIONS[c], add_generation_prompt=agp, **kw)
    except Exception as e:
        text = {"error": f"{type(e).__name__}: {e}"}
    out[f"{t}|{c}|{int(agp)}|{int(tools)}"] = text
GOLDENS.write_text(json.dumps(out, indent=1, ensure_ascii=False, sort_keys=True) + "\n")
print(len(out), "cases;", sum(isinstance(v, dict) for v in out.values()), "errors")
