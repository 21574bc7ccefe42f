//! Encode and decode of the frames that carry message bodies: a
//! [`ClientFrame`] with a 1 KiB [`Request::Send`] body (what the server
//! decodes for every message) and a [`Push::Envelope`] with a 1 KiB body
//! (what it encodes for every delivery). Run with
//! `cargo bench -p messenger-proto --bench codec`.

#![allow(missing_docs, clippy::unwrap_used)]

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use messenger_proto::msg::{
    ClientFrame, DEFAULT_DEVICE, Envelope, OutgoingEnvelope, Push, Request, ServerFrame,
};
use messenger_proto::{LEN_PREFIX, decode, encode};

const BODY_LEN: usize = 1024;

fn body() -> Vec<u8> {
    (0..BODY_LEN).map(|i| (i % 251) as u8).collect()
}

fn send_frame() -> ClientFrame {
    ClientFrame {
        id: 41,
        request: Request::Send(OutgoingEnvelope {
            to: "bob".into(),
            to_device: DEFAULT_DEVICE,
            id: [7; 16],
            body: body(),
        }),
    }
}

fn push_frame() -> ServerFrame {
    ServerFrame::Push(Push::Envelope(Envelope {
        seq: 1_234_567,
        from: "alice".into(),
        from_device: DEFAULT_DEVICE,
        group: None,
        id: [7; 16],
        sent_at: 1_700_000_000,
        body: body(),
    }))
}

fn client_send(c: &mut Criterion) {
    let frame = send_frame();
    let bytes = encode(&frame).unwrap();
    let mut group = c.benchmark_group("client_frame_send_1k");
    group.throughput(Throughput::Bytes(BODY_LEN as u64));
    group.bench_function("encode", |b| {
        b.iter(|| black_box(encode(black_box(&frame)).unwrap()))
    });
    group.bench_function("decode", |b| {
        b.iter(|| black_box(decode::<ClientFrame>(black_box(&bytes[LEN_PREFIX..])).unwrap()))
    });
    group.bench_function("encode_decode", |b| {
        b.iter(|| {
            let bytes = encode(black_box(&frame)).unwrap();
            black_box(decode::<ClientFrame>(&bytes[LEN_PREFIX..]).unwrap())
        })
    });
    group.finish();
}

fn push_envelope(c: &mut Criterion) {
    let frame = push_frame();
    let bytes = encode(&frame).unwrap();
    let mut group = c.benchmark_group("push_envelope_1k");
    group.throughput(Throughput::Bytes(BODY_LEN as u64));
    group.bench_function("encode", |b| {
        b.iter(|| black_box(encode(black_box(&frame)).unwrap()))
    });
    group.bench_function("decode", |b| {
        b.iter(|| black_box(decode::<ServerFrame>(black_box(&bytes[LEN_PREFIX..])).unwrap()))
    });
    group.finish();
}

criterion_group!(benches, client_send, push_envelope);
criterion_main!(benches);
