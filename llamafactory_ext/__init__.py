"""Lance as a LLaMA-Factory data source, and LLaMA-Factory training on Ray Train.

Light on purpose (imported at interpreter start by the hook): the heavy parts live in
:mod:`llamafactory_ext.reader`, :mod:`llamafactory_ext.train` and :mod:`llamafactory_ext.webui`.

Example::

    import llamafactory_ext
    llamafactory_ext.activate()          # Lance entries of dataset_info.json now load
"""

from __future__ import annotations


def activate() -> bool:
    """Install the Lance loader into LLaMA-Factory in this process; return True if newly installed."""
    from llamafactory_ext.patch import activate as _activate

    return _activate()


__all__ = ["activate"]
