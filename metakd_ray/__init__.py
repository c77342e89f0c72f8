"""metakd-ray: Meta-KD (Pan et al., ACL 2021) across domains, at cluster scale on Ray."""

__version__ = "0.1.0"
