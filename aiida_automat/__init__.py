"""aiida-automat: from an atomic-resolution STEM image of a 2D material to a crystal structure and its energies.

The package has two layers. The science core (``imaging``, ``denoise``, ``lattice``, ``library``,
``reconstruct``, ``energy``, ``agent``, ``bench``) is plain Python on numpy/ASE/pymatgen and never imports
AiiDA, so it can be tested and reused without a database. The provenance layer (``data``,
``calculations``, ``parsers``, ``workflows``, ``cli``) wraps the core with AiiDA nodes.
"""

__version__ = "0.1.0"
