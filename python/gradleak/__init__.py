"""gradleak: how much one model gradient leaks, from Python.

    import gradleak
    rec = gradleak.attack(model, [p.grad for p in model.parameters()], loss="ce")
    rec.inputs, rec.labels, rec.exact, rec.residuals, rec.batch_size, rec.report
    gradleak.evaluate(true_inputs, rec)
    gradleak.export_model(cnn, "DIR")   # model.json + model.safetensors for `gradleak attack --model DIR`

The work is done by the Rust library (gradleak._native); torch is optional.
`gradleak.flower` (a Flower strategy wrapper) and `gradleak.text` (transformer text
attack: `gradleak.text.attack(model, grads)`, needs torch + transformers) are imported
on first use.
"""

from ._native import GradleakError, __version__
from ._api import Reconstruction, attack, evaluate, load_data
from ._cnn import export_model
from ._sweep import sweep

__all__ = ["GradleakError", "Reconstruction", "attack", "evaluate", "export_model", "load_data", "sweep", "__version__"]


def __getattr__(name):
    if name in ("flower", "text"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'gradleak' has no attribute '{name}'")
