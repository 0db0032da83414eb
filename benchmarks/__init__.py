"""pluralign's performance budgets, measured against peers in the same run (docs/design.md §8)."""
