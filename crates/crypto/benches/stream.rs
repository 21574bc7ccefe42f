//! STREAM throughput: single 64 KiB chunks through the push API, and a
//! 16 MiB buffer through the `Read`/`Write` adapters. Run with
//! `cargo bench -p messenger-crypto --bench stream`.

#![allow(missing_docs, clippy::unwrap_used)]

use std::hint::black_box;

use chacha20poly1305::aead::AeadInOut;
use chacha20poly1305::{ChaCha20Poly1305, Key, KeyInit, Nonce};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use messenger_crypto::stream::{
    CHUNK_LEN, FileKey, StreamDecryptor, StreamEncryptor, TAG_LEN, decrypt_stream, encrypt_stream,
};
use rand::SeedableRng;
use rand::rngs::StdRng;

const STREAM_LEN: usize = 16 << 20;

fn fixture(len: usize) -> (FileKey, Vec<u8>) {
    let key = FileKey::from_bytes([7; 32]);
    let data = (0..len).map(|i| (i % 251) as u8).collect();
    (key, data)
}

fn chunks(c: &mut Criterion) {
    let (key, plaintext) = fixture(CHUNK_LEN);
    let (mut encryptor, header) = StreamEncryptor::new(&key, &mut StdRng::seed_from_u64(1));
    let sealed = StreamEncryptor::resume(&key, &header, 0)
        .unwrap()
        .encrypt_chunk(&plaintext, false)
        .unwrap();

    let mut group = c.benchmark_group("stream_chunk_64k");
    group.throughput(Throughput::Bytes(CHUNK_LEN as u64));
    let mut buf = Vec::with_capacity(CHUNK_LEN + TAG_LEN);
    buf.extend_from_slice(&plaintext);
    group.bench_function("encrypt_in_place", |b| {
        b.iter(|| {
            buf.truncate(CHUNK_LEN);
            encryptor.encrypt_chunk_in_place(&mut buf, false).unwrap();
            black_box(&buf);
        })
    });
    group.bench_function("decrypt_in_place", |b| {
        b.iter_batched_ref(
            || (StreamDecryptor::new(&key, &header).unwrap(), sealed.clone()),
            |(decryptor, chunk)| {
                decryptor.decrypt_chunk_in_place(chunk, false).unwrap();
                black_box(chunk);
            },
            BatchSize::SmallInput,
        )
    });
    // The bare AEAD on the same buffer: the floor STREAM adds to.
    let aead = ChaCha20Poly1305::new(&Key::from([7; 32]));
    let mut bare = plaintext.clone();
    group.bench_function("chacha20poly1305_baseline", |b| {
        b.iter(|| {
            let tag = aead
                .encrypt_inout_detached(&Nonce::from([0; 12]), &[], bare.as_mut_slice().into())
                .unwrap();
            black_box(tag);
        })
    });
    group.finish();
}

fn streams(c: &mut Criterion) {
    let (key, plaintext) = fixture(STREAM_LEN);
    let mut rng = StdRng::seed_from_u64(2);
    let mut ciphertext = Vec::new();
    encrypt_stream(&key, &mut rng, &mut plaintext.as_slice(), &mut ciphertext).unwrap();

    let mut group = c.benchmark_group("stream_16m");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(STREAM_LEN as u64));
    let mut out = Vec::with_capacity(ciphertext.len());
    group.bench_function("encrypt_stream", |b| {
        b.iter(|| {
            out.clear();
            encrypt_stream(&key, &mut rng, &mut plaintext.as_slice(), &mut out).unwrap();
            black_box(&out);
        })
    });
    group.bench_function("decrypt_stream", |b| {
        b.iter(|| {
            out.clear();
            decrypt_stream(&key, &mut ciphertext.as_slice(), &mut out).unwrap();
            black_box(&out);
        })
    });
    group.finish();
}

criterion_group!(benches, chunks, streams);
criterion_main!(benches);
