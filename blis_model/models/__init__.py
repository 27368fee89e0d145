"""Step-time model families. Each is a scikit-learn style estimator over feature frames
(see ``blis_model.features.frame``), linear in physics features per regime / configuration."""
