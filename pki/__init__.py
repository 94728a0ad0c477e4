"""hsmca domain core: policy (RA), signer (CA), store (SA), hsm, revocation, audit.

Nothing in this package imports a web framework; the HTTP and CLI layers call the
use-case functions in :mod:`pki.service`.
"""
