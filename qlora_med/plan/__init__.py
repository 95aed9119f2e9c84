"""Memory and step-time planning: the analytic estimate and its inputs from a recipe."""
