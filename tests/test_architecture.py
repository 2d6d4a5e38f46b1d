"""The layers of docs/architecture.md: what import-linter's contracts do not say on their own."""

from __future__ import annotations

import subprocess
import sys

import grimp


def test_no_module_imports_itself_through_others():
    """No circle among volseg's modules, function-level imports included (grimp sees those)."""
    graph = grimp.build_graph("volseg")
    circles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            chain = graph.find_shortest_chain(importer=imported, imported=module)
            if chain:
                circles.append((module, *chain))
    assert not circles, circles[:5]


def test_inference_loads_without_training_evaluation_or_planning():
    """What users deploy: importing the predictor and the batch runner pulls in none of the
    layers above inference."""
    code = ("import sys, volseg.inference, volseg.inference.export; "
            "print(sorted(m for m in sys.modules if m.startswith(('volseg.training', 'volseg.evaluation', 'volseg.planning', "
            "'volseg.workflows', 'volseg.cli'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out


def test_import_volseg_is_light_and_names_the_public_api():
    """``import volseg`` loads no torch; the names the README shows resolve from ``volseg``."""
    code = ("import sys, volseg; assert 'torch' not in sys.modules, 'torch imported'; "
            "names = [volseg.train, volseg.Predictor, volseg.load_config, volseg.read_image, volseg.infer_many, volseg.evaluate]; "
            "print(len(names))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "6", out.stderr
