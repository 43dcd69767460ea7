"""The registered protections, one module each (SEP and the methods it is measured against).

Every module here is imported on the registry's first lookup (``sep_hf.protect.PROTECTIONS``).
"""
