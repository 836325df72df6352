"""``conceptseg_triton``: the Triton model repository templates and the tool that fills them.

Each ``<model>/config.pbtxt`` (``engine/config.<profile>.pbtxt`` for the four engine models) is a
template with ``${key}`` slots; ``<model>/1/model.py`` is thin glue over the ``conceptseg``
package. ``fill_template.build_repository`` writes a servable repository for a profile.
"""
