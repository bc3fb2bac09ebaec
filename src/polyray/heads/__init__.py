"""Task heads: small models that client teams train on a shared embedding and apply to it.

``kinds`` holds the shared vocabulary (kinds, specs, parameters); ``train`` fits a head from
embedded examples; ``apply`` runs many heads of one model version as one matrix product;
``store`` keeps heads, their artifacts and their training examples in the database.
"""
