"""Koopman student: operators, KDM model, losses and networks."""
