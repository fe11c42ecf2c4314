"""Importers of the published CAUSE and STEGO model files into run directories."""
