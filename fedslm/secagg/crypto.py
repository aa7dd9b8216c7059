"""The cryptographic primitives, all from ``cryptography``: X25519, HKDF-SHA256,
ChaCha20-Poly1305 (shares in transit) and the ChaCha20 keystream (mask expansion).

Masks are expanded with ChaCha20 rather than numpy's PCG64: PCG64 is a statistical generator
whose state can be recovered from its output (Bouillaguet, Martinez, Sauvage 2020), and a mask
must stay unpredictable to a coordinator that sees masked vectors of structured data. ChaCha20
is a standard stream cipher (RFC 8439) whose keystream is a CSPRNG; OpenSSL produces it at
about 1-3 GB/s on one core, so a 1M-coordinate mask costs a few milliseconds.
"""

from __future__ import annotations

import os

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
NONCE_BYTES = 12
_LABEL = b"fedslm-secagg/v1 "
_ZERO_NONCE = bytes(16)  # ChaCha20's 16-byte counter||nonce; each mask seed keys one stream only


def keypair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair as raw bytes: (private, public)."""
    sk = X25519PrivateKey.generate()
    return sk.private_bytes_raw(), sk.public_key().public_bytes_raw()


def public_key(private: bytes) -> bytes:
    """The raw public key of a raw X25519 private key."""
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def ids(*values: int) -> bytes:
    """Site ids as fixed-width bytes, for KDF labels and associated data."""
    return b"".join(v.to_bytes(8, "big") for v in values)


def kdf(secret: bytes, session: bytes, purpose: bytes) -> bytes:
    """A 32-byte key for one purpose of one session (HKDF-SHA256, salt = session)."""
    return HKDF(hashes.SHA256(), KEY_BYTES, salt=session, info=_LABEL + purpose).derive(secret)


def agree(private: bytes, peer_public: bytes, session: bytes, purpose: bytes) -> bytes:
    """X25519 shared secret with a peer, through the KDF (raw X25519 output is not a key).

    ValueError for a malformed or low-order peer key.
    """
    peer = X25519PublicKey.from_public_bytes(peer_public)
    shared = X25519PrivateKey.from_private_bytes(private).exchange(peer)
    return kdf(shared, session, purpose)


def encrypt(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """ChaCha20-Poly1305 with a random nonce, returned as ``nonce || ciphertext || tag``.

    The nonce is random although each key is meant to encrypt once: a site that retries a round
    with the same keys (Flower can re-deliver a message) re-shares with fresh randomness, and a
    repeated nonce under one key would leak both plaintexts' XOR and allow forgeries.
    """
    nonce = os.urandom(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, aad)


def decrypt(key: bytes, blob: bytes, aad: bytes) -> bytes | None:
    """The plaintext, or None when the ciphertext, the nonce or the associated data was altered
    (or the key is wrong)."""
    if len(blob) < NONCE_BYTES + 16:
        return None
    try:
        return ChaCha20Poly1305(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
    except InvalidTag:
        return None


def prg(seed: bytes, size: int, dtype: np.dtype) -> np.ndarray:
    """``size`` uniform ring elements (little-endian ``dtype``) from the ChaCha20 keystream of
    ``seed``; read-only. Deterministic and portable: same seed, same mask on every machine."""
    nbytes = size * np.dtype(dtype).itemsize
    stream = Cipher(algorithms.ChaCha20(seed, _ZERO_NONCE), mode=None).encryptor()
    return np.frombuffer(stream.update(bytes(nbytes)), dtype=dtype)
