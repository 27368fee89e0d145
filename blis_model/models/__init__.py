"""Step-time model families. Each is a scikit-learn style estimator over feature frames
(see ``blis_model.dataset``), linear in physics features per regime / configuration."""
