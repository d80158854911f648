"""Importing this module registers orz_fast with veRL (``orz_fast.integrations.verl.register()``).

Name it in ``VERL_USE_EXTERNAL_MODULES`` so that every veRL process, Ray workers included,
imports it when it imports ``verl``.
"""

from orz_fast.integrations.verl import register

register()
