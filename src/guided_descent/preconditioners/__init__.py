"""Matrix-shaped update rules as free functions of tensors (Muon, Shampoo, SOAP, K-FAC)."""
