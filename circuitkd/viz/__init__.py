"""Pure figure builders: each takes a computed result and returns a ``plotly.graph_objects.Figure``.

Nothing here calls ``.show()`` or changes plotly's global templates; scripts save the
figures and notebooks show them. Submodules are imported on demand (``circuitkd.viz.attention``,
...) so that ``import circuitkd`` stays light.
"""
