"""unsupseg: unsupervised semantic segmentation (CAUSE, STEGO, Leopart) on frozen backbones.

The Python verbs mirror the CLI: ``unsupseg.fit(...)``, ``unsupseg.load(run).predict(image)``,
``unsupseg.evaluate(...)``, ``unsupseg.segment(...)``, ``unsupseg.segment_image(...)``, ``unsupseg.label(...)``,
``unsupseg.export(...)``.
"""

__version__ = "0.1.0"

_API = ("fit", "load", "evaluate", "segment", "segment_image", "label", "export", "Segmenter", "resolve_config")


def __getattr__(name):
    # the API pulls in torch and timm: import it on first use so `import unsupseg` stays light
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'unsupseg' has no attribute {name!r}")


__all__ = list(_API)
