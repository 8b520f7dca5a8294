"""The privacy audit: attacks that measure what each mechanism protects.

* :mod:`~fedcrypt.audit.observe`: one real round of a job, and what its server reads of each update;
* :mod:`~fedcrypt.audit.inversion`: gradient inversion (DLG, iDLG, cosine + total variation);
* :mod:`~fedcrypt.audit.leakage`: attacking the observed updates, and the selective-encryption sweep;
* :mod:`~fedcrypt.audit.membership`: membership inference on a job's final model;
* :mod:`~fedcrypt.audit.metrics`, :mod:`~fedcrypt.audit.figures`: scores and pictures.

Submodules are imported on use (the attacks alone need only PyTorch, NumPy and scikit-image).
"""
