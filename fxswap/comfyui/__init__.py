"""fxswap's ComfyUI nodes: block swap for the MODEL of ComfyUI's own loaders, a WAN loader, a plan view.

ComfyUI imports this folder from ``custom_nodes/`` (a symlink to it works; see README). It is only
ever imported inside ComfyUI: the nodes need the ``comfy`` package. The symlink must NOT be named
``fxswap``: ComfyUI registers a custom-node folder under its own name in ``sys.modules``, which would
shadow the fxswap package itself.
"""

from fxswap.comfyui.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
