"""Arms the lancetag LLaMA-Factory hook in processes started with PYTHONPATH=<this folder>."""

try:
    import llamafactory_ext.hook as _lancetag_hook

    _lancetag_hook.install_import_hook()
except ImportError:  # lancetag is not installed in this interpreter: nothing to arm
    pass
