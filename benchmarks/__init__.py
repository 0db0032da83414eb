"""pluralign's performance budgets, measured against peers in the same run (DESIGN §8)."""
