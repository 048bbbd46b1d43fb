# SPDX-License-Identifier: Apache-2.0
"""Experiments that reproduce the papers' claims.

``pyro-ebm reproduce NAME`` imports ``pyro_ebm.experiments.<NAME with _ for ->``
and calls its ``run(out_dir, quick=False)``, which writes figures into
``out_dir`` and returns a Markdown section for ``docs/results.md``.
"""
