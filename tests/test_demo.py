"""`make demo` runs the same pipeline as this test: download -> cloudwriter -> curate -> captions -> latents
-> coco."""

from __future__ import annotations

import collections

import demo
from testbed.corpus import bucket_of


def test_demo_pipeline_end_to_end(tmp_path, capsys):
    # The Python steps run in this process as their own would (run_script): the pipeline and its data
    # are the test's; each step's process is its own tests'.
    result = demo.main(['--out', str(tmp_path / 'demo'), '--images', '40', '--coco_images', '8'],
                       in_process=True)
    images = demo.sample_images(40)
    want = collections.Counter(bucket_of(min(it.width, it.height)) for it in images)
    want[bucket_of(min(images[0].width, images[0].height))] += 1  # the metadata's redirect row
    assert result['buckets'] == dict(want)  # every downloaded image once, in its bucket
    # curate: the planted copy (same bytes, another URL, in 256-512) and the redirect row (the first
    # image's bytes again) are found and dropped, nothing else
    original = next(it for it in images if bucket_of(min(it.width, it.height)) == '256-512')
    grouped, kept = (3, 1) if original is images[0] else (4, 2)
    assert (result['curated']['in_groups'], result['curated']['kept_of_groups']) == (grouped, kept)
    assert result['curated']['written'] == sum(want.values()) - 2
    assert open(result['curated']['preview']['path'], 'rb').read(8) == b'\x89PNG\r\n\x1a\n'
    curated = want['256-512'] - 1 - (bucket_of(min(images[0].width, images[0].height)) == '256-512')
    assert result['latents'] == curated
    # the captioned bucket: every curated sample once, each with a caption, and the latents step read it
    assert len(result['captions']) == curated and all(result['captions'])
    assert result['latents_keys'] == result['captioned_keys'] and result['latents_have_vlm_caption']
    assert result['vlm_caption_latents'] == curated  # --caption_keys: text latents of both captions
    assert result['coco'] == 8
    assert set(result['previews']) == set(want)  # a contact sheet per bucket, each a PNG
    for png in result['previews'].values():
        assert open(png, 'rb').read(8) == b'\x89PNG\r\n\x1a\n'
    table = capsys.readouterr().out
    assert ': caption_latents' in table and ': vlm_caption_latents' in table
    assert '(4, 32, 32)' in table and 'seconds: latents' in table
    assert 'the captions are noise' in table and 'seconds: captions' in table
    assert any(line.startswith('preview 256-512 ') and line.endswith(result['previews']['256-512'])
               for line in table.splitlines())
